"""Exact resume: a run SIGKILLed mid-training and resumed from its last checkpoint repeats, step for
step, the losses of an uninterrupted run - data order, crops, masks, dropout and the EMA teacher
included - for MAE-3D and for a teacher/student method (SelfMedHPM, the cheapest tiny one). With the
online segmentation probe on in the killed and resumed run (and off in the reference), the losses
are still those of the reference: the probe changes neither the training stream nor the resumed state.

The killed run is a real ``python -m lightning_mim fit`` process; it checkpoints after every step
and is killed at a step drawn from a fixed seed, while it sits in that step's
``on_train_batch_end`` - before the step's checkpoint exists - so the resumed run restarts from
the step before and must redo the step identically. The uninterrupted and resumed runs go
through the same CLI in this process.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_probes import REPO, cli_command, read_losses, subprocess_env

from lightning_mim.cli import main

CONFIGS = REPO / "tests" / "configs"
METHODS = {
    "mae": [REPO / "experiments/mae.yaml", CONFIGS / "mae_tiny.yaml"],
    "selfmedhpm": [REPO / "experiments/selfmedhpm.yaml", CONFIGS / "selfmedhpm_tiny.yaml"],
}
TOTAL_STEPS = 6  # 3 epochs x 2 steps (tests/configs/reliability_resume.yaml over the tiny configs)
# Runs: (method, arguments of every run, arguments of the killed and resumed run only).
RUNS = {
    "mae": ("mae", [], []),
    "selfmedhpm": ("selfmedhpm", [], []),
    # the probe reads the encoder through its UNETR export, which needs 12 ViT blocks
    "mae-probe": ("mae", ["--model.init_args.depth", "12"], [
        "--trainer.callbacks+=lightning_mim.callbacks.probe.SegmentationProbe",
        "--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.crops_per_case", "2",
        "--trainer.callbacks.init_args.head_steps", "20",
        "--trainer.callbacks.init_args.data", '{"phantom_cases": 4}']),
}


def config_args(method: str, data_dir: Path) -> list[str]:
    configs = [arg for path in (*METHODS[method], CONFIGS / "reliability_resume.yaml") for arg in ("--config", str(path))]
    return [*configs, "--data.init_args.phantom_root", str(data_dir / "phantoms"),
            "--data.init_args.cache_dir", str(data_dir / "cache")]


def fit_args(method: str, run_dir: Path, data_dir: Path, losses: Path, hold_at_step: int | None = None) -> list[str]:
    recorder = ["--trainer.callbacks+=reliability_probes.LossRecorder", "--trainer.callbacks.init_args.path", str(losses)]
    if hold_at_step is not None:
        recorder += ["--trainer.callbacks.init_args.hold_at_step", str(hold_at_step)]
    return ["fit", *config_args(method, data_dir), "--trainer.default_root_dir", str(run_dir), *recorder]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Phantoms and caches of both tiny configs, prepared once (the runs below then only read them)."""
    from lightning_mim.reliability.check_data import data_module_from_args

    root = tmp_path_factory.mktemp("resume-data")
    for method in METHODS:
        data_module_from_args(config_args(method, root)).prepare_data()
    return root


def start_run_to_kill(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), cwd=REPO, env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when_held(process: subprocess.Popen, losses: Path, timeout: float = 240) -> int:
    """SIGKILL the run once it holds at the marked step; return that step."""
    hold = Path(f"{losses}.hold")
    deadline = time.monotonic() + timeout
    try:
        while not hold.exists():
            if process.poll() is not None:
                raise AssertionError(f"the run ended (code {process.returncode}) before it was killed:\n"
                                     f"{process.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the run did not reach the kill step in time")
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return int(hold.read_text())


@pytest.mark.timeout(420)
@pytest.mark.parametrize("run", list(RUNS))
def test_run_killed_with_sigkill_resumes_with_identical_losses(run, tmp_path, data_dir):
    method, common, interrupted_only = RUNS[run]
    kill_step = random.Random(f"kill-{method}").randint(2, TOTAL_STEPS - 1)
    resumed_losses = tmp_path / "resumed.jsonl"
    run_dir = tmp_path / "interrupted"
    interrupted = [*common, *interrupted_only]
    process = start_run_to_kill(
        [*fit_args(method, run_dir, data_dir, resumed_losses, hold_at_step=kill_step), *interrupted])

    reference_losses = tmp_path / "reference.jsonl"  # runs while the other process starts up
    main([*fit_args(method, tmp_path / "reference", data_dir, reference_losses), *common])
    reference = read_losses(reference_losses)
    assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))

    assert kill_when_held(process, resumed_losses) == kill_step
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == kill_step - 1  # killed before the step's own checkpoint was written

    main([*fit_args(method, run_dir, data_dir, resumed_losses), *interrupted, "--ckpt_path", "last"])

    resumed = read_losses(resumed_losses)
    assert sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), f"step {step}"
    # the step that was redone after the kill gave the same loss both times
    redone = [r for r in resumed_losses.read_text().splitlines() if f'"step": {kill_step},' in r]
    assert len(redone) == 2 and len(set(redone)) == 1

    final = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ending = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == ending["global_step"] == TOTAL_STEPS
    for key, value in final["state_dict"].items():  # teacher weights and buffers included
        torch.testing.assert_close(ending["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_training_stream_is_a_pure_function_of_the_epoch_and_leaves_global_generators_alone(data_dir):
    from lightning_mim.reliability.check_data import data_module_from_args

    module = data_module_from_args(config_args("mae", data_dir))
    module.setup()
    loader = module.build_train_loader()

    def epoch(number: int) -> list[tuple[list[str], torch.Tensor]]:
        module.set_epoch(number)
        return [(batch["case_id"], batch["image"].clone()) for batch in loader]

    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = epoch(0)
    assert torch.equal(torch.get_rng_state(), before[0])  # the model's random stream is untouched
    # the stream swaps only torch's generator: a draw from Python's or NumPy's would escape it
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    again = epoch(0)
    assert len(first) == len(again) >= 2
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, epoch(1)))

    module.set_epoch(0)
    loader.load_state_dict({"epoch": 0, "batches": 1})
    resumed = [(batch["case_id"], batch["image"]) for batch in loader]
    assert [r[0] for r in resumed] == [f[0] for f in first[1:]]
    assert all(torch.equal(r[1], f[1]) for r, f in zip(resumed, first[1:]))
