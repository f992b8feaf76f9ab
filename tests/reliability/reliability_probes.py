"""Test-only callbacks and helpers for the reliability tests (importable by class path from the CLI).

The CLI finds them as ``reliability_probes.<Name>``: pytest puts this folder on ``sys.path``, and
subprocesses get it through ``PYTHONPATH`` (see :func:`subprocess_env`).
"""

from __future__ import annotations

import json
import os
import signal as signal_module
import sys
import time
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class LossRecorder(L.Callback):
    """Appends ``{"step", "loss"}`` per training batch to a JSON-lines file (flushed and fsync'ed).

    With ``hold_at_step`` it then writes ``<path>.hold`` and sleeps, so a test can kill the
    process at a known point: inside that step's ``on_train_batch_end``, before its checkpoint.
    With ``pause_file`` (read at training start; holds a global step) it writes ``<path>.paused`` at
    that step and waits until the preemption handler has received a signal, so a signal sent from
    outside lands at a known step however slow the machine is.
    """

    def __init__(self, path: str, hold_at_step: int | None = None, pause_file: str | None = None) -> None:
        self.path = Path(path)
        self.hold_at_step = hold_at_step
        self.pause_file = pause_file
        self.pause_at_step: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        pause = Path(self.pause_file) if self.pause_file else None
        self.pause_at_step = int(pause.read_text()) if pause is not None and pause.is_file() else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "loss": float(loss), "case_id": list(batch["case_id"])}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.hold_at_step is not None and trainer.global_step == self.hold_at_step:
            Path(f"{self.path}.hold").write_text(str(trainer.global_step))
            time.sleep(300)
        if self.pause_at_step is not None and trainer.global_step == self.pause_at_step:
            # wait (signal handlers run between the sleeps) until the preemption handler got a signal
            Path(f"{self.path}.paused").write_text(str(trainer.global_step))
            deadline = time.monotonic() + 600  # a guard only: the test signals as soon as it sees the file
            while time.monotonic() < deadline and not any(getattr(c, "received", None) for c in trainer.callbacks):
                time.sleep(0.05)


class SignalAtStep(L.Callback):
    """Sends ``signal`` to this very process at the start of the batch of global step ``step``.

    With ``step_file`` instead, the step is read from that file when training starts (no file: no
    signal), so attempts of one run can signal at different steps with the same configuration.
    """

    def __init__(self, step: int | None = None, signal: str = "SIGUSR1", step_file: str | None = None) -> None:
        self.step = step
        self.step_file = step_file
        self.signal = getattr(signal_module, signal)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.step_file is not None:
            path = Path(self.step_file)
            self.step = int(path.read_text()) if path.is_file() else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class TrainingTripwire(L.Callback):
    """Fails loudly if a batch reaches the training loop (the bad-input tests expect none to)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise AssertionError(f"a batch reached the training loop: {batch.get('case_id')}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        raise AssertionError("an optimizer step was taken")


class PoisonLoss(L.Callback):
    """Makes the method's loss non-finite at the chosen global steps (through its real training step).

    Wraps the module's ``shared_step`` so that the returned ``loss`` and the named term
    (``reconstruction`` by default) become ``value`` (NaN by default) when ``global_step`` is in
    ``steps`` - the gradients then carry the NaN as a real divergence would.
    """

    def __init__(self, steps: list[int], term: str = "reconstruction", value: float = float("nan")) -> None:
        self.steps = set(steps)
        self.term = term
        self.value = value

    def on_fit_start(self, trainer, pl_module) -> None:
        original = pl_module.shared_step

        def poisoned(batch):
            out = original(batch)
            if pl_module.training and trainer.global_step in self.steps:
                bad = torch.tensor(self.value, device=out.losses["loss"].device)
                out.losses["loss"] = out.losses["loss"] * bad
                out.losses[self.term] = out.losses[self.term] * bad
            return out

        pl_module.shared_step = poisoned


def wandb_records(run_folder: Path):
    """The protobuf records of an offline W&B run's ``run-<id>.wandb`` transaction log.

    The log is a sequence of 32 KiB blocks after a 7-byte header; each piece of a record has a
    7-byte header (checksum, little-endian length, kind: 1 whole, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", f"not a W&B transaction log: {run_folder}"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # no room left in the block for a piece header: padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def logged_steps(run_folder: Path, key: str) -> tuple[str | None, list[int]]:
    """Run id of an offline W&B run folder and the ``trainer/global_step`` of each history row with ``key``."""
    run_id, steps = None, []
    for record in wandb_records(run_folder):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if key in items and "trainer/global_step" in items:
                steps.append(int(json.loads(items["trainer/global_step"])))
    return run_id, steps


def read_losses(path: Path) -> dict[int, float]:
    """Step -> loss; a step recorded twice (re-run after a resume) keeps its last value."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of CLI subprocesses: one thread, offline W&B, these probes importable.

    ``WANDB_SERVICE`` is dropped: a W&B run of this process sets it, and a child would otherwise
    talk to this process's wandb-core instead of starting its own.
    """
    leaky = ("SLURM_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "WANDB_SERVICE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaky)}
    paths = [str(HERE), str(REPO), env.get("PYTHONPATH", "")]
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_mim", *args]
