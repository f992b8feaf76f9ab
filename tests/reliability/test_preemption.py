"""Preemption: SIGTERM / SIGUSR1 save a checkpoint and end the run cleanly (exit code 0); the next
run of the same command resumes it automatically, in the same W&B run; ``--auto_resume false``
starts a new one.

One story through the real CLI: a ``python -m lightning_mim fit`` process gets SIGTERM from
outside; the same command, run again (in this process), resumes and gets SIGUSR1 (sent to itself
by a test callback, through the real handler); the third run finishes. Every step is trained
exactly once across the three attempts, and each attempt has its own W&B offline folder - the
second and third start within the same second in practice - whose logs together hold every step
once, all under the one run id (what ``wandb sync`` of the folders uploads as one run).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import wandb
from reliability_probes import (
    REPO,
    cli_command,
    logged_steps,
    read_losses,
    subprocess_env,
)

from lightning_mim.cli import main

TOTAL_STEPS = 4  # tests/configs/mae_tiny.yaml: 2 epochs x 2 steps


def fit_args(tmp_path: Path, losses: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml"),
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "runs"), "--data.init_args.phantom_root", str(tmp_path / "phantoms"),
            "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.callbacks+=reliability_probes.LossRecorder",
            "--trainer.callbacks.init_args.path", str(losses),
            "--trainer.callbacks.init_args.pause_file", str(tmp_path / "pause_step"),
            "--trainer.callbacks+=reliability_probes.SignalAtStep",
            "--trainer.callbacks.init_args.step_file", str(tmp_path / "signal_step"), *extra]


def last_checkpoint(runs: Path, run_id: str) -> dict:
    return torch.load(runs / "lightning-mim" / run_id / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)


@pytest.mark.timeout(900)
def test_signals_checkpoint_and_stop_cleanly_and_the_same_command_resumes_the_same_run(tmp_path, caplog):
    runs, losses = tmp_path / "runs", tmp_path / "losses.jsonl"

    # 1. SIGTERM from outside, while the run waits after its first step
    (tmp_path / "pause_step").write_text("1")
    process = subprocess.Popen(cli_command(*fit_args(tmp_path, losses)), cwd=REPO, env=subprocess_env(),
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while not Path(f"{losses}.paused").exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training step in time"  # a generous guard only
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "received SIGTERM: saved" in stderr
    run_id = (runs / "wandb_run_id.txt").read_text().strip()
    first_stop = last_checkpoint(runs, run_id)["global_step"]
    assert first_stop == 1 and max(read_losses(losses)) == first_stop
    (tmp_path / "pause_step").unlink()

    # 2. the same command resumes; SIGUSR1 (delivered to this process) stops it at the next step
    caplog.set_level(logging.INFO)
    (tmp_path / "signal_step").write_text(str(first_stop))  # the same configuration signals at this step
    assert main(fit_args(tmp_path, losses)) == 0
    assert f"auto-resume: continuing from {runs / 'lightning-mim' / run_id / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert "Restoring states from the checkpoint path" in caplog.text
    assert (runs / "wandb_run_id.txt").read_text().strip() == run_id
    assert last_checkpoint(runs, run_id)["global_step"] == first_stop + 1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone with the run

    # 3. and again: it finishes
    (tmp_path / "signal_step").unlink()
    assert main(fit_args(tmp_path, losses)) == 0
    assert last_checkpoint(runs, run_id)["global_step"] == TOTAL_STEPS
    steps = [json.loads(line)["step"] for line in losses.read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # each step trained exactly once
    wandb.teardown()  # waits for W&B's writer process: the last attempt's log is complete
    attempts = sorted((runs / "wandb").glob(f"offline-run-*-{run_id}*"))  # a folder each, never shared
    assert len(attempts) == 3, attempts
    logged = [logged_steps(folder, "train/loss_step") for folder in attempts]
    assert {logged_id for logged_id, _ in logged} == {run_id}, logged
    # each attempt logged a row for every step it trained, the preempted step included
    trained = [first_stop, 1, TOTAL_STEPS - first_stop - 1]
    assert [len(steps) for _, steps in logged] == trained, logged
    assert logged[0][1] == list(range(first_stop)), logged

    # 4. --auto_resume false: a new W&B run, nothing restored (no step needed to tell)
    caplog.clear()
    assert main([*fit_args(tmp_path, tmp_path / "fresh.jsonl", "--auto_resume", "false"),
                 "--trainer.limit_train_batches", "0", "--trainer.limit_val_batches", "0"]) == 0
    assert (runs / "wandb_run_id.txt").read_text().strip() != run_id
    assert "auto-resume" not in caplog.text and "Restoring states" not in caplog.text
