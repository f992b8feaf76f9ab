"""W&B sweeps drive the real CLI: the command wandb's agent builds for a trial is accepted and sets
exactly the sampled values.

The command is built by the installed wandb agent itself (``wandb_agent.Agent._command_run``, which
expands ``${env}``, ``${interpreter}``, ``${args}``... from the sweep's ``command``), with only the
process launch intercepted. Trials are drawn here as the sweep service would: every grid point,
or random draws from the declared distributions, parameters ordered by name as the sweep library
sends them.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_mim.cli import main
from lightning_mim.loggers import resolve_run_id

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "experiments" / "sweeps"


def load_sweep(name: str) -> dict:
    sweep = yaml.safe_load((SWEEPS / name).read_text())
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert "${args}" in sweep["command"], "parameters reach the CLI through ${args} (--name=value)"
    assert sweep.get("metric") or sweep["method"] != "bayes", "bayes search needs a metric"
    return sweep


def draw(spec: dict, rng: random.Random):
    """One value of a sweep parameter, for the distributions our sweeps use."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    kind = spec.get("distribution", "uniform")
    if kind == "uniform":
        return rng.uniform(spec["min"], spec["max"])
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
    if kind == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    raise AssertionError(f"distribution {kind!r} is not handled by this test")


def grid_trials(sweep: dict) -> list[dict]:
    names = sorted(sweep["parameters"])
    choices = [sweep["parameters"][n].get("values", [sweep["parameters"][n].get("value")]) for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def agent_command(sweep: dict, trial: dict, monkeypatch, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Command line and environment wandb's agent would start the trial with."""
    from wandb import wandb_agent

    launched = []

    class Launch:
        def __init__(self, command=None, env=None, **kwargs):
            launched.append((command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", Launch)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep0")
    monkeypatch.setenv("WANDB_RUN_ID", "unset")  # the agent overwrites it; monkeypatch restores it afterwards
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep0")
    agent._sweep_command = list(sweep["command"])
    args = {name: {"value": trial[name]} for name in sorted(trial)}
    agent._command_run({"type": "run", "run_id": "trial0", "program": sweep.get("program"), "args": args})
    (command, env), = launched
    return command, env


def resolved_config(command: list[str], monkeypatch, capsys) -> dict:
    """``--print_config`` output of the agent's command, run in-process from the repository root."""
    start = command.index("lightning_mim") + 1
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning_mim"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_info:
        main([*command[start:], "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def run_agent_command(command: list[str], env: dict[str, str]) -> dict:
    """The agent's exact command as a process (``python`` from PATH, as in an activated environment)."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    done = subprocess.run([*command, "--print_config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return yaml.safe_load(done.stdout)


def method_class_paths() -> dict[str, str]:
    return {f"experiments/{p.name}": yaml.safe_load(p.read_text())["model"]["class_path"]
            for p in (REPO / "experiments").glob("*.yaml")
            if (yaml.safe_load(p.read_text()).get("model") or {}).get("class_path", "").startswith("lightning_mim.methods.")}


def test_compare_methods_grid_runs_every_method_with_its_seed(monkeypatch, tmp_path, capsys):
    sweep = load_sweep("compare_methods.yaml")
    recipes = method_class_paths()
    grid = sweep["parameters"]["config"]["values"]
    assert set(recipes.values()) <= {recipes.get(path) for path in grid}, "a pre-training method is missing from the grid"

    seeds = sweep["parameters"]["seed_everything"]["values"]
    trials = grid_trials(sweep)
    assert len(trials) == len(grid) * len(seeds)
    # Every method once, the seeds taking turns: each config file and each seed value is exercised.
    covering = [{"config": path, "seed_everything": seeds[i % len(seeds)]} for i, path in enumerate(grid)]
    assert all(trial in trials for trial in covering)
    for trial in covering:
        command, _ = agent_command(sweep, trial, monkeypatch, tmp_path)
        config = resolved_config(command, monkeypatch, capsys)
        assert config["model"]["class_path"] == recipes[trial["config"]], trial
        assert config["seed_everything"] == trial["seed_everything"], f"the method file overrode the seed: {command}"
        assert config["trainer"]["precision"] == "bf16-mixed"
        assert config["trainer"]["logger"]["init_args"]["offline"] is False
        assert config["trainer"]["logger"]["init_args"]["group"] == "compare-methods"

    # The agent's exact process, for a trial whose seed differs from the one in its method file.
    trial = next(t for t in covering if yaml.safe_load((REPO / t["config"]).read_text()).get("seed_everything") != t["seed_everything"])
    command, env = agent_command(sweep, trial, monkeypatch, tmp_path)
    assert command[:2] == ["/usr/bin/env", "python"]
    config = run_agent_command(command, env)
    assert config["model"]["class_path"] == recipes[trial["config"]]
    assert config["seed_everything"] == trial["seed_everything"]


def test_mae_sweep_sets_mask_ratio_lr_and_boolean(monkeypatch, tmp_path, capsys):
    sweep = load_sweep("mae_mask_ratio_lr.yaml")
    defaults = yaml.safe_load((REPO / "experiments" / "mae.yaml").read_text())["model"]["init_args"]
    rng = random.Random(0)
    trials = [{name: draw(spec, rng) for name, spec in sweep["parameters"].items()} for _ in range(4)]
    for trial, flag in zip(trials, (True, False, True, False)):  # both values of the boolean, whatever the draw
        trial["model.init_args.norm_pix_loss"] = flag

    for trial in trials:
        command, _ = agent_command(sweep, trial, monkeypatch, tmp_path)
        assert f"--model.init_args.norm_pix_loss={trial['model.init_args.norm_pix_loss']}" in command
        model = resolved_config(command, monkeypatch, capsys)["model"]
        assert model["class_path"] == "lightning_mim.methods.mae.MAE3D"
        for name, value in trial.items():
            key = name.removeprefix("model.init_args.")
            assert model["init_args"][key] == value, f"{name}: sampled {value}, CLI resolved {model['init_args'][key]}"
        assert model["init_args"]["mask_ratio"] != defaults["mask_ratio"]
        assert model["init_args"]["lr"] != defaults["lr"]

    command, env = agent_command(sweep, trials[1], monkeypatch, tmp_path)
    config = run_agent_command(command, env)
    assert config["model"]["init_args"]["norm_pix_loss"] is False
    assert config["model"]["init_args"]["mask_ratio"] == trials[1]["model.init_args.mask_ratio"]
    assert config["trainer"]["logger"]["init_args"]["offline"] is False


def test_trial_logs_to_the_run_the_agent_created(monkeypatch, tmp_path):
    """The agent hands each trial its run id in WANDB_RUN_ID; it must win over a SLURM-derived id."""
    sweep = load_sweep("mae_mask_ratio_lr.yaml")
    trial = {name: draw(spec, random.Random(1)) for name, spec in sweep["parameters"].items()}
    _, env = agent_command(sweep, trial, monkeypatch, tmp_path)
    assert env["WANDB_RUN_ID"] == "trial0"
    monkeypatch.setenv("WANDB_RUN_ID", env["WANDB_RUN_ID"])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert resolve_run_id(tmp_path, "lightning-mim") == "trial0"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert resolve_run_id(tmp_path, "lightning-mim") == "slurm-4242"
