"""Checkpoint and leave cleanly on SIGUSR1 / SIGTERM (preemption, wall-time warning, ``kill``).

Under SLURM with auto-requeue, Lightning's own handler owns these signals (it writes
``hpc_ckpt_<n>.ckpt`` and requeues the job; the CLI resumes from the newest checkpoint), and this
callback stays out of the way. Everywhere else it installs handlers once training starts. A
handler only records the signal (and forwards it to DDP workers Lightning launched); at the end
of the current batch - of the current optimizer step under gradient accumulation - every rank
agrees to stop and ``last.ckpt`` is written atomically. Right after Lightning has logged that
step's metrics (at the next batch start, validation start or epoch end, before anything else
runs), the W&B run is marked preempted and closed and :class:`TrainingPreempted` ends ``fit``. The CLI turns it into exit code 0; the next run with
the same configuration resumes from that checkpoint and continues the same W&B run.

Stopping by exception rather than ``trainer.should_stop`` is deliberate: ``should_stop`` lets the
epoch finish - validation, epoch-end checkpoints that mark the epoch as done (a resume would then
skip the rest of it), and the end-of-training encoder export of a model that has not finished.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mim.reliability.checkpoint_io import save_last_checkpoint


class TrainingPreempted(Exception):
    """``fit`` stopped on a signal after saving a checkpoint to resume from."""


class PreemptionCheckpoint(L.Callback):
    """On one of ``signals``: save ``last.ckpt`` at the next step boundary and stop ``fit``.

    Args:
        signals: signal names to handle.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")) -> None:
        names = list(signals)
        unknown = [name for name in names if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"unknown signal name(s) {unknown}")
        self.signals = names
        self.received: int | None = None
        self._stopping: str | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # workers Lightning started get the same notice

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._stopping = None
        # The connector's environment, as Lightning's own signal set-up reads it (single-device
        # strategies have none of their own).
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            rank_zero_info("SLURM auto-requeue: Lightning handles the preemption signal (hpc checkpoint + requeue)")
            return
        self._trainer = trainer
        for name in self.signals:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): leave the signal alone
                continue

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        self._trainer = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not progress.is_last_batch:
            return  # in the middle of an accumulation cycle: stop after its optimizer step
        path = save_last_checkpoint(trainer)
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        self._stopping = (f"received {name}: saved {path} at global step {trainer.global_step} "
                          f"(epoch {trainer.current_epoch}); run the same command again to resume")

    def _stop(self, trainer: L.Trainer) -> None:
        """Ends ``fit`` once the step saved in ``last.ckpt`` has had its metrics logged."""
        if self._stopping is None:
            return
        message, self._stopping = self._stopping, None
        for logger in trainer.loggers:
            logger.finalize("finished")  # the W&B logger marks the run preempted and closes it
        raise TrainingPreempted(message)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._stop(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(trainer)
