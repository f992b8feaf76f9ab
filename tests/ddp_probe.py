"""Test-only callback that records what each rank of a real CLI run did (used by the DDP and SLURM tests).

Added on the command line with ``--trainer.callbacks+=tests.ddp_probe.Probe
--trainer.callbacks.init_args.out_dir=DIR``. Every process writes ``DIR/rank<r>-attempt<a>.json``
(``a`` = ``SLURM_RESTART_COUNT``, else ``PROBE_ATTEMPT``, else 0): the case ids of every batch it
trained on, the global step when training started and after every batch, the W&B run id and the
root dir; per batch also the loss and the first numbers the global torch generator will hand the
method (its mask noise: drawn from a copy of the generator, so training is not changed); at the
start and end of training it saves its full ``state_dict`` (weights *and* buffers such as teacher
centers) to ``DIR/rank<r>-attempt<a>.start.pt`` / ``.pt``.

``signal_file``: when that file exists at training start, it holds a global step; every rank then
sends itself SIGTERM at the start of that step's batch (the preemption handler stops the run).

``pause_at_step`` makes the first attempt of a SLURM job wait after that optimizer step (all ranks
at the same point, so no collective is in flight) until SIGTERM or ``pause_seconds``: the test sends
the requeue signal while the job is known to be mid-run, and Lightning's handler checkpoints from a
quiet state. ``DIR/paused-rank<r>`` tells the test the rank is waiting.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class Probe(L.Callback):
    """Per-rank record of a training run.

    Args:
        out_dir: folder for the per-rank records (created).
        pause_at_step: global step after which the first SLURM attempt waits; None = never.
        pause_seconds: longest wait before training goes on anyway (a guard, far above any signal delay).
    """

    def __init__(self, out_dir: str, pause_at_step: int | None = None, pause_seconds: float = 900.0,
                 signal_file: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.pause_at_step = pause_at_step
        self.pause_seconds = pause_seconds
        self.signal_file = signal_file
        self.signal_step: int | None = None
        self.attempt = int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("PROBE_ATTEMPT") or 0)
        self.record: dict[str, Any] = {}

    def _path(self, trainer: L.Trainer, suffix: str) -> Path:
        return self.out_dir / f"rank{trainer.global_rank}-attempt{self.attempt}.{suffix}"

    def _write(self, trainer: L.Trainer) -> None:
        path = self._path(trainer, "json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logger = trainer.logger
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "attempt": self.attempt,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "run_id": None if logger is None else str(logger.version),
            "default_root_dir": str(Path(trainer.default_root_dir).resolve()),
            "start_step": trainer.global_step,
            "global_step": trainer.global_step,
            "batches": [],
        }
        self._write(trainer)
        torch.save(self._state(pl_module), self._path(trainer, "start.pt"))
        path = Path(self.signal_file) if self.signal_file else None
        self.signal_step = int(path.read_text()) if path is not None and path.is_file() else None

    @staticmethod
    def _state(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        upcoming = torch.Generator().set_state(torch.get_rng_state())
        self.record["batches"].append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                       "case_ids": list(batch["case_id"]),
                                       "rng_sample": torch.rand(8, generator=upcoming).tolist()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.record["global_step"] = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.record["batches"][-1]["loss"] = float(loss)
        self._write(trainer)
        if self.attempt == 0 and trainer.global_step == self.pause_at_step:
            (self.out_dir / f"paused-rank{trainer.global_rank}").touch()
            deadline = time.monotonic() + self.pause_seconds
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.05)  # signal handlers run between these sleeps

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["global_step"] = trainer.global_step
        self.record["finished"] = True
        self._write(trainer)
        torch.save(self._state(pl_module), self._path(trainer, "pt"))
