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
are comparable across epochs.

Under DDP the global generators are per rank, as in the MAE reference code: rank ``r`` reseeds
them with ``seed + r`` when ``fit`` sets up (rank 0 keeps ``seed``, so a single-process run is
unchanged), so masks and dropout on different ranks are independent draws; validation uses
``validation_seed + r``. The data stream is seeded from ``(seed, epoch, rank)`` by the data
module, independently of these. A checkpoint holds every rank's generator states (gathered to
rank 0 when it is written) and each rank restores its own.

Exact on CPU; on GPUs also set ``trainer.deterministic: true`` (cuDNN and atomics otherwise
reorder floating-point sums), and ``benchmark: false``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

TESTED_LIGHTNING = ">=2.6,<2.7"  # keep equal to pyproject.toml's pin


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
    drops it whenever ``configure_optimizers`` sets up the training data (as
    :func:`~lightning_mim.optimisation.trainer_run_length` does, to learn the epoch length, and as
    ``trainer.estimated_stepping_batches`` does): that builds and starts the training loader before
    the checkpoint's loop state is loaded, and the loader state it saved is never
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
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's seed_everything)
        if stage == "fit" and trainer.global_rank > 0 and seed is not None:
            seed_global_rng(int(seed) + trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's generator states (``rng_per_rank``; ``rng`` is rank 0's) and the stream position.

        Lightning builds the checkpoint on every rank (``Trainer.save_checkpoint`` is collective),
        so the states are gathered here; rank 0 writes them.
        """
        # During validation the live generators hold the validation stream; training's is stashed.
        rng = self._training_rng if self._training_rng is not None else capture_global_rng()
        per_rank = [rng]
        if self._trainer is not None and self._trainer.world_size > 1 and torch.distributed.is_initialized():
            per_rank = [None] * self._trainer.world_size
            torch.distributed.all_gather_object(per_rank, rng)
        loaders = _stateful_train_loaders(self._trainer) if self._trainer is not None else []
        return {"rng": per_rank[0], "rng_per_rank": per_rank, "data": [loader.state_dict() for loader in loaders]}

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
            # Lightning has no public way to restart the fetcher: its private ``_data_fetcher`` is
            # used, with lightning pinned to the tested range (pyproject.toml) and a test that fails
            # if the attribute goes or changes meaning (tests/reliability/test_resume_edges.py).
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is None:
                raise RuntimeError(f"lightning {L.__version__}: the fit loop has no _data_fetcher to restart on the "
                                   "restored training stream; lightning-mim's exact resume is tested with "
                                   f"lightning {TESTED_LIGHTNING}")
            iter(fetcher)  # restart the fetcher on the restored stream (drops its stale pre-fetched batch)
        per_rank = pending.get("rng_per_rank")
        saved_ranks = len(per_rank) if per_rank is not None else 1  # older checkpoints: rank 0's only
        if per_rank is not None and saved_ranks == trainer.world_size:
            restore_global_rng(per_rank[trainer.global_rank])
        elif trainer.global_rank == 0 and pending.get("rng") is not None:
            restore_global_rng(pending["rng"])
        if saved_ranks != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random generator states of {saved_ranks} rank(s), this "
                           f"run has {trainer.world_size}: the other ranks keep their seed + rank generators, so "
                           "the resumed run is not an exact continuation")
        rank_zero_info("restored the training-stream position and the random generator states of the checkpoint")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._training_rng = capture_global_rng()
        seed_global_rng(self.validation_seed + trainer.global_rank)

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
