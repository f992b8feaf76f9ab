"""Exact resume: random generator states in checkpoints, validation on its own stream, auto-resume.

What makes a resumed run repeat the interrupted one step for step:

* model, optimizer, LR scheduler, EMA teacher and method buffers - Lightning's checkpoint;
* the data stream (patch positions, order, views, augmentation): a pure function of
  ``(seed, epoch, rank)`` (:class:`data_modules.resumable.ResumableLoader`); its mid-epoch
  position and the global random generators the methods draw masks and dropout from are saved and
  restored by :class:`ResumeState` (Lightning saves generator states only in its removed
  fault-tolerant mode). States are tensors and plain numbers, so checkpoints still load with
  ``torch.load(weights_only=True)``.

Validation draws (e.g. MAE's masks on validation batches) come from a fixed seed instead of the
training stream, so whether and when validation runs never shifts training, and validation losses
are comparable across epochs. Under DDP every rank starts from the same seed and draws the same
shapes, so rank 0's states (the ones in the checkpoint) are every rank's.

Exact on CPU; on GPUs also set ``trainer.deterministic: true`` (cuDNN and atomics otherwise
reorder floating-point sums), and ``benchmark: false``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def capture_global_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), ``random`` and NumPy global states, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_global_rng`."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_global_rng(seed: int) -> None:
    torch.manual_seed(seed)  # also every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _stateful_train_loaders(trainer: L.Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [] if loaders is None else [loaders]
    return [loader for loader in loaders if callable(getattr(loader, "state_dict", None))
            and callable(getattr(loader, "load_state_dict", None))]


class ResumeState(L.Callback):
    """Saves the global random generators and the training-stream position with every checkpoint.

    Both are put back at ``on_train_start``: after model set-up, checkpoint restore and Lightning's
    own restart bookkeeping, right before the first step, so nothing in between can shift them.

    The stream position is restored here rather than by Lightning alone because Lightning 2.6
    drops it whenever ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (as
    :class:`~lightning_mim.methods.base.MIMModule` does): that builds and starts the training
    loader before the checkpoint's loop state is loaded, and the loader state it saved is never
    handed back. So the position goes into this callback's state too, is loaded into the loader at
    ``on_train_start``, and the trainer's fetcher is restarted on it (a pure stream, so restarting
    is harmless when Lightning did restore it).

    Args:
        validation_seed: validation (outside the sanity check, which Lightning already isolates)
            runs with the global generators seeded with this value, and the training states are
            put back afterwards.
    """

    def __init__(self, validation_seed: int = 0) -> None:
        self.validation_seed = validation_seed
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None
        self._training_rng: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        # During validation the live generators hold the validation stream; training's is stashed.
        rng = self._training_rng if self._training_rng is not None else capture_global_rng()
        loaders = _stateful_train_loaders(self._trainer) if self._trainer is not None else []
        return {"rng": rng, "data": [loader.state_dict() for loader in loaders]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        loaders = _stateful_train_loaders(trainer)
        positions = pending.get("data") or []
        if positions and len(positions) == len(loaders):
            for loader, position in zip(loaders, positions):
                loader.load_state_dict(position)
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)  # restart the fetcher on the restored stream (drops its stale pre-fetched batch)
        if pending.get("rng") is not None:
            restore_global_rng(pending["rng"])
        rank_zero_info("restored the training-stream position and the random generator states of the checkpoint")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._training_rng = capture_global_rng()
        seed_global_rng(self.validation_seed)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._training_rng is not None:
            restore_global_rng(self._training_rng)
            self._training_rng = None


def resume_checkpoint(run_dir: str | Path | None, default_root_dir: str | Path | None) -> str | None:
    """The checkpoint an automatic resume starts from: the newest of the run's ``last.ckpt`` and
    Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` (``"hpc"``), or None for a fresh run."""
    candidates: dict[str, float] = {}
    if run_dir is not None:
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            candidates[str(last)] = last.stat().st_mtime
    if default_root_dir is not None:
        for hpc in Path(default_root_dir).glob("hpc_ckpt_*.ckpt"):
            candidates["hpc"] = max(candidates.get("hpc", 0.0), hpc.stat().st_mtime)
    return max(candidates, key=candidates.get) if candidates else None
