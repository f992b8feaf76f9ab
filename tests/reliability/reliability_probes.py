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
    """

    def __init__(self, path: str, hold_at_step: int | None = None) -> None:
        self.path = Path(path)
        self.hold_at_step = hold_at_step

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


class SignalAtStep(L.Callback):
    """Sends ``signal`` to this very process at the start of the batch of global step ``step``."""

    def __init__(self, step: int, signal: str = "SIGUSR1") -> None:
        self.step = step
        self.signal = getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
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
