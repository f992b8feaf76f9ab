"""Distributed training and mixed precision, on CPU.

* Real 2-process DDP (gloo) runs of the real CLI — ``python -m lightning_mim fit ... --trainer.devices 2
  --trainer.strategy ddp``, with Lightning launching the second process — on the phantom cohort:
  the ranks must train on disjoint subjects, run the same number of steps, agree on the W&B run and
  end with identical weights and buffers (teacher centers included). Methods with cross-rank
  reductions (SMIT centers, HybridMIM negatives) get their own run.
* Every method's training step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what
  ``precision: bf16-mixed`` does) returns finite float32 losses.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from slurm_cluster import scrubbed_environment

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"

# The one method whose whole 2-process CLI run is part of the default suite: SMIT (it all-reduces its
# teacher centres; the run also checks per-rank draws, disjoint shards, one W&B run and equal weights).
# Methods that reduce across ranks inside their loss — HybridMIM and SimCLR-3D (gathered NT-Xent
# negatives), DINOv2-3D (Sinkhorn-Knopp, centring) — have those collectives checked by two gloo
# processes at the block level in the default suite (tests/test_contrastive.py,
# tests/test_dinov2_distributed.py); their CLI runs are under -m slow (25–50 s each on 2 cores), as are
# VoCo's and Swin UNETR SSL's (64³ Swin crops) and every other method's, to keep the default suite
# within 10 minutes. The plain case, MAE, also runs 2-rank DDP through srun in tests/test_slurm.py.
DEFAULT_DDP_METHODS = ("smit",)
# Cross-rank options the recipes leave off (HybridMIM's official code uses per-GPU negatives).
DDP_OPTIONS = {name: ["--model.init_args.gather_negatives=true"] for name in ("hybridmim_swin", "hybridmim_unet")}
# ddp_common.yaml: 4 training subjects, 2 per rank, 2 patches each, batch 2 -> 2 steps per epoch, 2 epochs.
TRAIN_CASES = 4
EXPECTED_STEPS = 4
# Buffers that are per-rank by design (BatchNorm statistics of the last local forward).
LOCAL_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def method_experiments() -> dict[str, Path]:
    """``experiments/<name>.yaml`` files whose model is a pre-training method, by name."""
    found = {}
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        class_path = (config.get("model") or {}).get("class_path", "")
        if class_path.startswith("lightning_mim.methods."):
            found[path.stem] = path
    return found


def tiny_config(name: str) -> Path:
    """The method's tiny test overrides, ``tests/configs/<name>_tiny.yaml``."""
    path = CONFIGS / f"{name}_tiny.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no tests/configs/{name}_tiny.yaml for experiments/{name}.yaml")
    return path


#: Shared bases in lightning_mim.methods, not methods (no recipe of their own).
METHOD_BASE_MODULES = ("base", "teacher_student", "mae_base")


def method_classes() -> set[str]:
    """``module.Class`` of every MIMModule subclass defined in ``lightning_mim.methods``."""
    import lightning_mim.methods as methods
    from lightning_mim.methods.base import MIMModule

    names = set()
    for info in pkgutil.iter_modules(methods.__path__):
        if info.name in METHOD_BASE_MODULES:
            continue
        module = importlib.import_module(f"lightning_mim.methods.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, MIMModule) and obj is not MIMModule \
                    and obj.__module__ == module.__name__:
                names.add(f"{obj.__module__}.{obj.__name__}")
    return names


EXPERIMENTS = method_experiments()


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ddp-data")
    return {"phantom_root": str(root / "phantoms"), "cache_dir": str(root / "cache")}


def test_every_method_has_a_recipe_and_a_tiny_config():
    recipes = {yaml.safe_load(p.read_text())["model"]["class_path"] for p in EXPERIMENTS.values()}
    assert method_classes() <= recipes, f"methods without experiments/*.yaml: {sorted(method_classes() - recipes)}"
    for name in EXPERIMENTS:
        tiny_config(name)
    assert set(DEFAULT_DDP_METHODS) <= set(EXPERIMENTS), "a default DDP run names a recipe that no longer exists"


# ---------------------------------------------------------------------------------------------- DDP
def run_ddp(name: str, tmp_path: Path, data_dirs: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path, Path]:
    runs, probe = tmp_path / "runs", tmp_path / "probe"
    command = [
        sys.executable, "-m", "lightning_mim", "fit",
        "--config", str(EXPERIMENTS[name]), "--config", str(tiny_config(name)), "--config", str(CONFIGS / "ddp_common.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
        "--data.init_args.phantom_root", data_dirs["phantom_root"], "--data.init_args.cache_dir", data_dirs["cache_dir"],
        "--trainer.callbacks+=tests.ddp_probe.Probe", "--trainer.callbacks.init_args.out_dir", str(probe),
        *DDP_OPTIONS.get(name, []),
    ]
    # No SLURM/rank variables from the caller: this must be Lightning's own 2-process launch.
    env = scrubbed_environment({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                                "PYTHONFAULTHANDLER": "1"})
    return run_process_group(command, env, timeout=420), runs, probe


def run_process_group(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout kill it with every process it started (the DDP ranks)."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: every rank prints its stacks, then aborts
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s:\n{stdout[-3000:]}\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def ddp_params():
    for name in EXPERIMENTS:
        marks = () if name in DEFAULT_DDP_METHODS else (pytest.mark.slow,)
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", list(ddp_params()))
def test_two_process_ddp_run_of_the_cli(name, tmp_path, data_dirs):
    started = time.monotonic()
    done, runs, probe = run_ddp(name, tmp_path, data_dirs)
    assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    records = [json.loads((probe / f"rank{r}-attempt0.json").read_text()) for r in (0, 1)]
    print(f"{name}: 2-process DDP run took {time.monotonic() - started:.1f} s")

    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world_size"] == 2 and record.get("finished"), record
        assert record["global_step"] == EXPECTED_STEPS, f"rank {rank} ran {record['global_step']} steps"
    assert len(records[0]["batches"]) == len(records[1]["batches"])
    # per-rank generators (seed + rank): the numbers masks and dropout are drawn from differ per rank
    for first, second in zip(records[0]["batches"], records[1]["batches"]):
        assert first["rng_sample"] != second["rng_sample"], f"both ranks drew the same numbers at step {first['step']}"

    # Disjoint subject shards in every epoch, covering the training cohort.
    for epoch in range(2):
        seen = [{c for b in record["batches"] if b["epoch"] == epoch for c in b["case_ids"]} for record in records]
        assert seen[0] and seen[1], f"epoch {epoch}: a rank trained on nothing: {seen}"
        assert not seen[0] & seen[1], f"epoch {epoch}: ranks shared subjects {seen[0] & seen[1]}"
        assert len(seen[0] | seen[1]) == TRAIN_CASES, f"epoch {epoch}: subjects seen {seen}"

    # One W&B run and one run folder for both ranks; the id file names that run; the HPC checkpoint
    # folder (default_root_dir) is the run folder.
    run_id = records[0]["run_id"]
    assert records[1]["run_id"] == run_id
    run_dir = (runs / "lightning-mim" / run_id).resolve()
    assert records[0]["default_root_dir"] == records[1]["default_root_dir"] == str(run_dir)
    assert (runs / "wandb_run_id.txt").read_text().strip() == run_id
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # Identical weights and buffers at the end, and training did change them.
    states = [torch.load(probe / f"rank{r}-attempt0.pt", weights_only=True) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    differing = [k for k in states[0] if not k.endswith(LOCAL_BUFFER_SUFFIXES) and not torch.equal(states[0][k], states[1][k])]
    assert not differing, f"rank 0 and rank 1 ended with different {differing[:10]}"
    initial = torch.load(probe / "rank0-attempt0.start.pt", weights_only=True)
    assert any(not torch.equal(initial[k], states[0][k]) for k in initial), "training changed no weight"
    centers = [k for k in states[0] if k.endswith("center")]
    if name == "smit":
        assert centers and all(states[0][k].abs().sum() > 0 for k in centers), f"SMIT teacher centers never moved: {centers}"


# ------------------------------------------------------------------- per-rank randomness, resume
@pytest.mark.slow  # three 2-process runs; the default DDP runs above check the per-rank draws
@pytest.mark.timeout(900)
def test_ranks_draw_their_own_masks_and_a_killed_two_process_run_resumes_exactly(tmp_path, data_dirs):
    """Per-rank generators (seed + rank): the numbers each rank's masks are drawn from differ across
    ranks at every step, while the data stream stays that of (seed, epoch, rank). A 2-process run
    stopped by SIGTERM mid-epoch and run again with the same command reproduces the uninterrupted
    run's per-rank losses and random draws step for step (each rank restored its own generators)."""
    def launch(runs: Path, probe: Path, attempt: int) -> dict[int, list[dict]]:
        command = [
            sys.executable, "-m", "lightning_mim", "fit", "--config", str(EXPERIMENTS["mae"]),
            "--config", str(tiny_config("mae")), "--config", str(CONFIGS / "ddp_common.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs),
            "--data.init_args.phantom_root", data_dirs["phantom_root"], "--data.init_args.cache_dir", data_dirs["cache_dir"],
            "--trainer.callbacks+=tests.ddp_probe.Probe", "--trainer.callbacks.init_args.out_dir", str(probe),
            "--trainer.callbacks.init_args.signal_file", str(tmp_path / "signal_step"),
        ]
        env = scrubbed_environment({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                                    "PYTHONFAULTHANDLER": "1", "PROBE_ATTEMPT": str(attempt)})
        done = run_process_group(command, env, timeout=420)
        assert done.returncode == 0, f"CLI failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        return {r: json.loads((probe / f"rank{r}-attempt{attempt}.json").read_text())["batches"] for r in (0, 1)}

    whole = launch(tmp_path / "whole", tmp_path / "probe-whole", 0)
    assert all(len(whole[r]) == EXPECTED_STEPS for r in (0, 1)), whole
    for step in range(EXPECTED_STEPS):
        assert whole[0][step]["rng_sample"] != whole[1][step]["rng_sample"], f"ranks drew the same numbers at step {step}"

    (tmp_path / "signal_step").write_text("2")  # mid-epoch 1: both ranks stop after step index 2
    first = launch(tmp_path / "split", tmp_path / "probe-split", 0)
    (tmp_path / "signal_step").unlink()
    second = launch(tmp_path / "split", tmp_path / "probe-split", 1)
    for rank in (0, 1):
        trained = [b for b in first[rank] if "loss" in b] + second[rank]
        assert [b["step"] for b in trained] == list(range(EXPECTED_STEPS)), trained
        for resumed, uninterrupted in zip(trained, whole[rank]):
            assert resumed["case_ids"] == uninterrupted["case_ids"], (rank, resumed, uninterrupted)
            assert resumed["rng_sample"] == uninterrupted["rng_sample"], (rank, resumed["step"])
            assert resumed["loss"] == uninterrupted["loss"], (rank, resumed["step"], resumed["loss"], uninterrupted["loss"])


# ---------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset, accelerator, precision, strategy", [
    ("cpu", "cpu", "32-true", None),
    ("gpu", "gpu", "bf16-mixed", None),
    ("multi_gpu", "gpu", "bf16-mixed", "ddp"),
    ("multi_node", "gpu", "bf16-mixed", "ddp"),
])
def test_trainer_presets(preset, accelerator, precision, strategy, monkeypatch, capsys):
    """fp32 on CPU, bf16-mixed on GPUs, DDP for several GPUs/nodes; subjects stay sharded by the data module."""
    from lightning_mim.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["lightning_mim"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", "experiments/mae.yaml", "--config", f"experiments/trainer/{preset}.yaml", "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["accelerator"], trainer["precision"]) == (accelerator, precision)
    assert trainer["strategy"] == (strategy or "auto")
    assert trainer["use_distributed_sampler"] is False
    assert not trainer["sync_batchnorm"], "SyncBatchNorm would bypass the sparse CNN's own BatchNorm statistics"


# ---------------------------------------------------------------------------------------- precision
def bf16_params():
    """Every recipe through its CLI config. Two run by default (a single-view ViT and the two-view Swin); the
    others' bf16 steps are covered faster in the default suite by tests/test_gpu_paths.py (the original
    methods) or their own test files (the newer ones), so their recipe runs here are under -m slow
    (bf16 on a CPU is emulated: HybridMIM-Swin's step takes ~70 s)."""
    for name in sorted(EXPERIMENTS):
        yield pytest.param(name, marks=() if name in ("mae", "smit") else (pytest.mark.slow,), id=name)


@pytest.mark.parametrize("name", list(bf16_params()))
def test_losses_are_float32_under_bf16_autocast(name, tmp_path, data_dirs, monkeypatch):
    from lightning_mim.cli import MIMCLI

    monkeypatch.setattr(sys, "argv", ["lightning_mim"])  # pytest's own arguments are not the CLI's
    cli = MIMCLI(args=[
        "--config", str(EXPERIMENTS[name]), "--config", str(tiny_config(name)), "--config", str(CONFIGS / "ddp_common.yaml"),
        "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.num_workers=0", "--data.init_args.phantom_root", data_dirs["phantom_root"],
        "--data.init_args.cache_dir", data_dirs["cache_dir"],
    ], run=False)
    model, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.build_train_loader()))

    matmul_dtypes = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: matmul_dtypes.add(out.dtype))
             for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.shared_step(batch)
    for hook in hooks:
        hook.remove()

    assert torch.bfloat16 in matmul_dtypes, "autocast did not reach the network: the check would prove nothing"
    for term, value in out.losses.items():
        assert value.dtype == torch.float32, f"{name}: loss term {term!r} is {value.dtype}, compute losses in float32"
        assert torch.isfinite(value).all(), f"{name}: loss term {term!r} is not finite: {value}"
