"""What the pre-training and segmentation data modules share: a resumable, DDP-sharded TorchIO queue.

Each epoch's training stream is a ``tio.Queue`` over the rank's subject shard (a
``DistributedSampler`` under DDP, reshuffled by :meth:`PatchQueueDataModule.set_epoch`, which the
base LightningModule calls because Lightning cannot reach a sampler inside the queue), batched by a
collator seeded from ``(seed, epoch, rank)``, and wrapped in a :class:`ResumableLoader`.

The queue is rebuilt every epoch (it is cheap), but the subject loader feeding it is not: TorchIO's
queue builds a new ``DataLoader`` - new worker processes - for every pass over the subjects, which
made an epoch of a few volumes cost mostly process start-up. :class:`KeptWorkersQueue` draws every
epoch's subjects from one loader with ``persistent_workers``, kept for the whole run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .resumable import ResumableLoader, derive_seed, lightning_batches_used


class KeptWorkersQueue(tio.Queue):
    """A ``tio.Queue`` whose subjects come from a given loader, kept across epochs, instead of a
    loader (and worker processes) that the queue builds anew for each pass over the subjects.

    The epoch's random stream stays what it was with a new loader per epoch: the subject order is
    drawn from it when the pass starts (a ``RandomSampler`` without a generator, or a seeded
    ``DistributedSampler``), and one draw stands in for the worker seed that a new loader took from
    it - the kept loader seeds its workers once, from its own generator. The workers only load
    subjects and draw no random numbers (patches are cut here, in the main process), so keeping
    their random state across epochs changes nothing. Hence the patches are the same for any
    ``num_workers`` and as before the workers were kept.
    """

    def __init__(self, subjects_loader: DataLoader, **queue_arguments) -> None:
        self.subjects_loader = subjects_loader
        super().__init__(subjects_loader.dataset, start_background=False, **queue_arguments)

    def _get_subjects_iterable(self):  # TorchIO's hook: it builds a new DataLoader here
        self._num_sampled_subjects = 0
        torch.empty((), dtype=torch.int64).random_()  # the stand-in for a new loader's worker seed
        return iter(self.subjects_loader)


def kept_subjects_loader(subjects: tio.SubjectsDataset, sampler: DistributedSampler | None, num_workers: int,
                         seed: int) -> DataLoader:
    """The subject loader of :class:`KeptWorkersQueue`: TorchIO's settings (one subject per item,
    shuffled unless a sampler shards them), its workers persistent and seeded from ``seed``."""
    return DataLoader(
        subjects,
        batch_size=1,
        sampler=RandomSampler(subjects) if sampler is None else sampler,
        collate_fn=_only_item,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # the worker seeds only: the sampler has none
    )


def _only_item(batch: list):
    return batch[0]


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
        subjects_loader = kept_subjects_loader(subjects, sampler, self.num_workers, derive_seed(self.seed, rank, 2))

        def epoch_loader(epoch: int) -> DataLoader:
            if sampler is not None:
                sampler.set_epoch(epoch)
            queue = KeptWorkersQueue(  # its subject pass starts inside the epoch's random stream
                subjects_loader,
                max_length=self.queue_length,
                samples_per_volume=self.samples_per_volume,
                sampler=patch_sampler,
                subject_sampler=sampler,  # the queue counts the epoch's patches from it
                shuffle_subjects=False,  # the kept loader shuffles
                shuffle_patches=True,
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
