"""Checkpoints written atomically and read with clear errors.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary lives in
the system temp folder; when that is another file system (a node-local ``/tmp``, a checkpoint
folder on a network share) the final move is a copy, and a job killed during it leaves a
truncated ``last.ckpt`` - exactly the file an automatic resume then trips over. Here checkpoints go
through :func:`lightning_mim.run_files.atomic_write`: the temporary is created beside the target,
flushed to disk, and ``os.replace``'d over it, so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mim.run_files import atomic_write


class CheckpointFileError(RuntimeError):
    """A checkpoint cannot be read; the message names the file and why."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and load errors that name the file.

    Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        return None

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None):
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except UNREADABLE as error:
            raise checkpoint_error(path, error) from error


# What torch.load raises for a damaged file or a refused pickle.
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)


def checkpoint_error(path: str | os.PathLike, error: BaseException) -> CheckpointFileError | BaseException:
    """The clear error for a checkpoint ``torch.load`` could not read (``error`` itself when the file is missing)."""
    if isinstance(error, FileNotFoundError):
        return error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if isinstance(error, pickle.UnpicklingError):
        return CheckpointFileError(f"{path}: refused - the checkpoint holds objects other than tensors and plain values, "
                                   f"which are only loaded from trusted files ({reason})")
    return CheckpointFileError(f"{path}: not a readable checkpoint, it is truncated or corrupt ({reason}); resume from "
                               "another checkpoint, or start fresh with --auto_resume false")


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give the trainer :class:`AtomicCheckpointIO` unless a custom checkpoint IO is configured."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def save_last_checkpoint(trainer: L.Trainer) -> Path:
    """Save the current state as ``last.ckpt`` (the ModelCheckpoint folder, else
    ``<default_root_dir>/checkpoints``) and return its path.

    The ModelCheckpoint is told that this file is its ``last`` checkpoint; otherwise, in the run
    resumed from it, it would find a ``last.ckpt`` it did not write and save ``last-v1.ckpt``
    instead, leaving ``last.ckpt`` - the file auto-resume reads - stale.
    """
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        callback.last_model_path = str(path)
    else:
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path
