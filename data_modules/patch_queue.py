"""The TorchIO queue of the training stream, with subject-loading workers kept for the whole run.

Each epoch's training stream (built by :meth:`data_modules.base.VolumeDataModule.queue_loader`) is
a queue over the rank's subject shard (a ``DistributedSampler`` under DDP, set to the epoch as
each pass starts), batched by a collator seeded from ``(seed, epoch, rank)``, and wrapped in a
:class:`~data_modules.resumable.ResumableLoader`.

The queue is rebuilt every epoch (it is cheap), but the subject loader feeding it is not: TorchIO's
queue builds a new ``DataLoader`` - new worker processes - for every pass over the subjects, which
made an epoch of a few volumes cost mostly process start-up. :class:`KeptWorkersQueue` draws every
epoch's subjects from one loader with ``persistent_workers``, kept for the whole run.
"""

from __future__ import annotations

import torch
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


class KeptWorkersQueue(tio.Queue):
    """A ``tio.Queue`` whose subjects come from a given loader, kept across epochs, instead of a
    loader (and worker processes) that the queue builds anew for each pass over the subjects.

    The epoch's random stream stays what it was with a new loader per epoch: the subject order is
    drawn from it when the pass starts (a ``RandomSampler`` without a generator, or a seeded
    ``DistributedSampler``), and one draw stands in for the worker seed that a new loader took from
    it - the kept loader seeds its workers once, from its own generator. The workers only load
    subjects and draw no random numbers (patches are cut here, in the main process), so keeping
    their random state across epochs changes nothing. ``subject_transform`` runs here too, on each
    subject as it arrives, never in a worker: TorchIO's transforms draw a number each (to decide
    whether to apply), and in a worker those draws would leave the epoch's stream, which then
    depended on ``num_workers``. Hence the patches are the same for any ``num_workers`` and as
    before the workers were kept.
    """

    def __init__(self, subjects_loader: DataLoader, subject_transform: tio.Transform | None = None,
                 **queue_arguments) -> None:
        self.subjects_loader = subjects_loader
        self.subject_transform = subject_transform
        super().__init__(subjects_loader.dataset, start_background=False, **queue_arguments)

    def _get_subjects_iterable(self):  # TorchIO's hook: it builds a new DataLoader here
        self._num_sampled_subjects = 0
        torch.empty((), dtype=torch.int64).random_()  # the stand-in for a new loader's worker seed
        subjects = iter(self.subjects_loader)
        return subjects if self.subject_transform is None else map(self.subject_transform, subjects)


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
