"""W&B logging that is offline by default and keeps one run id across restarts.

Run folder layout (Lightning's): ``<save_dir>/<project>/<run id>/`` holds ``checkpoints/``, the
resolved ``lightning_config.yaml`` and ``panels/``; the offline W&B files live in ``<save_dir>/wandb``.
``<save_dir>/wandb_run_id.txt`` remembers the latest run id so that a restarted job (after a crash,
preemption or SLURM requeue) resumes the same checkpoint *and* the same W&B run.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

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
    """Explicit id, else the SLURM job's, else the persisted one when its run can be resumed, else new.

    The chosen id is written back to ``<save_dir>/wandb_run_id.txt`` (atomically).
    """
    run_id = explicit or slurm_run_id()
    if run_id is None and resume and resumable_checkpoint(save_dir, project) is not None:
        run_id = persisted_run_id(save_dir)
    run_id = run_id or secrets.token_hex(4)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
        raise ValueError(f"W&B run id {run_id!r} may only contain letters, digits, '-' and '_'")
    path = Path(save_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class MIMWandbLogger(WandbLogger):
    """``WandbLogger`` that is offline unless told otherwise and reuses the run id of a resumed run.

    Offline runs are uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``.

    Args:
        project: W&B project (also the middle part of the run folder).
        save_dir: root of this experiment's run folders.
        name, group, tags: W&B display name, group (e.g. the method or sweep) and tags.
        offline: write locally only; nothing touches the network.
        id: force a run id; by default see :func:`resolve_run_id`.
        resume: reuse the persisted id when its ``last.ckpt`` exists (the CLI resumes from it too).
        log_model: upload Lightning checkpoints as artifacts (off: exported encoders are what matter).
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
