"""W&B logging that is offline by default and keeps one run id across restarts.

Run folder layout (Lightning's): ``<save_dir>/<project>/<run id>/`` holds ``checkpoints/``, the
resolved ``lightning_config.yaml``, ``panels/``, the exported encoder and test metrics; the offline
W&B files live in ``<save_dir>/wandb``, one folder per attempt: ``offline-run-<start time>-<run id>``,
or ``offline-run-<start time>-<run id>-attempt<n>`` when an earlier attempt started in the same
second (so attempts never share one). ``<save_dir>/wandb_run_id.txt`` holds the latest run id; the ranks
of a DDP run read the id rank 0 chose from it. Which run a ``fit`` continues is decided by the CLI
(:mod:`lightning_mim.reliability.run_identity`).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_mim.run_files import atomic_write

RUN_ID_FILE = "wandb_run_id.txt"


def slurm_run_id() -> str | None:
    """A run id derived from the SLURM job (a requeued job keeps its job id)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"slurm-{array}-{task}" if array and task else f"slurm-{job}"


def persisted_run_id(save_dir: str | Path) -> str | None:
    path = Path(save_dir) / RUN_ID_FILE
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def resumable_checkpoint(save_dir: str | Path, project: str, run_id: str | None = None) -> Path | None:
    """``last.ckpt`` of the given (or persisted) run, if it exists."""
    run_id = run_id or persisted_run_id(save_dir)
    if not run_id:
        return None
    path = Path(save_dir) / project / run_id / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def resolve_run_id(save_dir: str | Path, project: str, explicit: str | None = None, resume: bool = True) -> str:
    """Explicit id, else the sweep agent's, else the SLURM job's, else the persisted one when its run can
    be resumed, else new.

    A W&B sweep agent starts each trial with ``WANDB_RUN_ID`` set: that run belongs to the sweep, so
    it wins over the SLURM id. Processes other than rank 0 that Lightning's DDP launcher starts
    (``LOCAL_RANK`` > 0 in their environment) run after rank 0 chose the id and read it from the
    file, so every rank agrees on the run folder. Rank 0 writes the chosen id back to
    ``<save_dir>/wandb_run_id.txt`` (atomically).
    """
    run_id = explicit or os.environ.get("WANDB_RUN_ID") or slurm_run_id()
    if run_id is None and rank_zero_only.rank > 0:
        run_id = persisted_run_id(save_dir)
        if run_id is None:
            raise RuntimeError(f"rank {rank_zero_only.rank} found no {RUN_ID_FILE} in {save_dir} written by rank 0; "
                               "pass the logger an explicit id when ranks start independently (e.g. torchrun)")
    if run_id is None and resume and resumable_checkpoint(save_dir, project) is not None:
        run_id = persisted_run_id(save_dir)
    run_id = run_id or secrets.token_hex(4)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
        raise ValueError(f"W&B run id {run_id!r} may only contain letters, digits, '-' and '_'")
    if rank_zero_only.rank > 0:
        return run_id
    atomic_write(Path(save_dir) / RUN_ID_FILE, run_id + "\n")
    return run_id


class MIMWandbLogger(WandbLogger):
    """``WandbLogger`` that is offline unless told otherwise and reuses the run id of a resumed run.

    Offline runs are uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``: all attempts
    of a run carry its id, so they sync into that one W&B run.

    Args:
        project: W&B project (also the middle part of the run folder).
        save_dir: root of this experiment's run folders.
        name, group, tags: W&B display name, group (e.g. the method or sweep) and tags.
        offline: write locally only; nothing touches the network.
        id: force a run id; by default see :func:`resolve_run_id`.
        resume: reuse the persisted id when its ``last.ckpt`` exists (the CLI resumes from it too).
        log_model: upload Lightning checkpoints as artifacts (off: exported encoders are what matter).

    ``run_dir`` is the run's folder ``<save_dir>/<project>/<id>`` (checkpoints, config, panels).
    """

    def __init__(
        self,
        project: str = "lightning-mim",
        save_dir: str = "runs",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        offline: bool = True,
        id: str | None = None,
        resume: bool = True,
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        run_id = resolve_run_id(save_dir, project, id, resume)
        kwargs.setdefault("resume", "allow")
        super().__init__(name=name, save_dir=save_dir, offline=offline, id=run_id, project=project,
                         log_model=log_model, group=group, tags=tags, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning always passes it; W&B warns it is deprecated
            self._wandb_init.pop("anonymous", None)
        self.run_dir = Path(save_dir) / project / run_id
        self._preempted = False

    @property
    def experiment(self):
        """The W&B run, started on first use; each attempt of a run in its own offline folder."""
        if self._experiment is None and rank_zero_only.rank == 0:
            self._give_attempt_its_own_folder()
        return super().experiment

    def _give_attempt_its_own_folder(self) -> None:
        """Suffix ``-attempt<n>`` on W&B's offline folder when an attempt of this run started this second.

        W&B names the folder ``offline-run-<start second>-<id>``; a resumed attempt started within
        the same second as the previous one would otherwise write into (and over) its files. W&B
        takes its start time after this check, so it can only be this second or a later one, and
        a folder of a later second cannot exist yet.
        """
        import wandb

        run_id = self._wandb_init["id"]
        wandb_dir = Path(self._wandb_init.get("dir") or self.save_dir or ".") / "wandb"
        now = datetime.fromtimestamp(time.time()).strftime("%Y%m%d_%H%M%S")  # W&B's format
        earlier = [*wandb_dir.glob(f"*run-*-{run_id}"), *wandb_dir.glob(f"*run-*-{run_id}-attempt*")]
        stamps = [match.group(1) for folder in earlier if (match := re.search(r"run-(\d{8}_\d{6})-", folder.name))]
        if not any(stamp >= now for stamp in stamps):
            return
        attempt = len(earlier) + 1
        while list(wandb_dir.glob(f"*run-*-{run_id}-attempt{attempt}")):
            attempt += 1
        settings = self._wandb_init.get("settings") or wandb.Settings()
        if isinstance(settings, dict):
            settings = wandb.Settings(**settings)
        settings.x_sync_dir_suffix = f"attempt{attempt}"
        self._wandb_init["settings"] = settings

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Closes the W&B run when Lightning's SLURM requeue handler finalizes loggers.

        That handler (status ``"finished"``, used nowhere else) saves the HPC checkpoint and
        requeues; slurm then kills every process of the job, W&B's writer process included, and
        whatever it had not written yet is lost (measured: the offline run of a short attempt stayed
        empty). So the run is marked preempting and finished now; the restarted job reopens the same
        run id with ``resume="allow"``. Metrics logged in the seconds before the kill are dropped.
        """
        super().finalize(status)
        if status == "finished" and self._experiment is not None and not self._preempted:
            self._preempted = True
            self._experiment.mark_preempting()
            self._experiment.finish(exit_code=1)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self._preempted:  # the run was closed for a requeue; the job is about to be killed
            super().log_metrics(metrics, step)
