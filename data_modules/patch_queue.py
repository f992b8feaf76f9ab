"""What the pre-training and segmentation data modules share: a resumable, DDP-sharded TorchIO queue.

Each epoch's training stream is a ``tio.Queue`` over the rank's subject shard (a
``DistributedSampler`` under DDP, reshuffled by :meth:`PatchQueueDataModule.set_epoch`, which the
base LightningModule calls because Lightning cannot reach a sampler inside the queue), batched by a
collator seeded from ``(seed, epoch, rank)``, and wrapped in a :class:`ResumableLoader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler

from .resumable import ResumableLoader, derive_seed, lightning_batches_used


class PatchQueueDataModule(L.LightningDataModule):
    """Base of the data modules whose training batches come from a TorchIO patch queue.

    Subclasses set ``seed``, ``queue_length``, ``samples_per_volume``, ``num_workers`` and
    ``batch_size``, and implement :meth:`build_train_loader` with :meth:`queue_loader`.
    """

    seed: int
    queue_length: int
    samples_per_volume: int
    num_workers: int
    batch_size: int

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0
        self._subject_sampler: DistributedSampler | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the per-rank subject shards for ``epoch``; safe before any loader exists."""
        self._epoch = epoch
        if self._subject_sampler is not None:
            self._subject_sampler.set_epoch(epoch)

    def build_train_loader(self, rank: int = 0, world_size: int = 1) -> ResumableLoader:
        """One rank's training loader; each data module builds its subjects and calls :meth:`queue_loader`."""
        raise NotImplementedError

    def queue_loader(self, subjects: tio.SubjectsDataset, patch_sampler: tio.data.PatchSampler,
                     make_collate: Callable[[int], Callable[[list], Any]], rank: int = 0,
                     world_size: int = 1) -> ResumableLoader:
        """The rank's resumable loader: per epoch, a queue of ``patch_sampler`` patches batched by
        ``make_collate(seed)``."""
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(subjects, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed,
                                         drop_last=False)
            sampler.set_epoch(self._epoch)
        self._subject_sampler = sampler

        def epoch_loader(epoch: int) -> DataLoader:
            if sampler is not None:
                sampler.set_epoch(epoch)
            queue = tio.Queue(
                subjects,
                max_length=self.queue_length,
                samples_per_volume=self.samples_per_volume,
                sampler=patch_sampler,
                subject_sampler=sampler,
                num_workers=self.num_workers,
                shuffle_subjects=sampler is None,
                shuffle_patches=True,
                start_background=False,  # the subject loader starts inside the epoch's random stream
            )
            collate = make_collate(derive_seed(self.seed, epoch, rank, 1))
            return DataLoader(queue, batch_size=self.batch_size, num_workers=0, collate_fn=collate)

        return ResumableLoader(epoch_loader, self.seed, rank, self._stream_epoch,
                               lambda: lightning_batches_used(self.trainer))

    def _stream_epoch(self) -> int:
        """The epoch a new pass over the training data belongs to: the trainer's, else the last set_epoch."""
        return self.trainer.current_epoch if self.trainer is not None else self._epoch

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        if trainer is None:
            return self.build_train_loader()
        self._epoch = trainer.current_epoch
        return self.build_train_loader(rank=trainer.global_rank, world_size=trainer.world_size)
