"""Pre-training data module: cached volumes -> TorchIO queue of patches (sharded per rank) -> views.

Data path, and why:

* ``prepare_data`` (one process per node) and ``setup`` (every process), through the shared base
  :class:`~data_modules.base.VolumeDataModule`, discover the cases, check them
  (:mod:`data_modules.validation`: readable, 3D, finite, plausible geometry; results cached)
  and preprocess them into the on-disk cache (:mod:`data_modules.cache`) on the same decode
  (:mod:`data_modules.prepare`); bad cases fail there, all together, before the first step - or
  are skipped with ``on_bad_case: skip``. ``python -m lightning_mim preprocess`` (same config) does
  this ahead of time, sharded over processes or a SLURM array; ``fit`` then only indexes the cache.
* Training subjects are lazily loaded TorchIO subjects over the cached ``.npy`` files
  (``load_getitem=False``, reader = memory map), so only tiny unloaded subjects ever travel to
  the queue. Its sampler (:class:`~data_modules.cache.MemoryMappedUniformSampler`) cuts patches
  as views of the maps; the collate function copies each patch's voxels once, into the batch. No
  volume is decoded, resampled, pickled or copied during training. Memory is bounded by the
  (reclaimable, file-backed) pages the queued patches touch, whatever the number of volumes.
* Under DDP each rank's queue gets a ``DistributedSampler`` over subjects. It pads by repeating
  subjects (``drop_last=False``) so every rank runs the same number of batches (unequal counts
  deadlock collectives); when the subject count is not divisible by the world size, a few subjects
  are therefore seen twice per epoch, on different ranks. Lightning does not reach this nested
  sampler: each pass sets it to the trainer's epoch as it starts (the one epoch hand-off, in
  :class:`~data_modules.base.VolumeDataModule`); build the Trainer with ``use_distributed_sampler=False``.
* The training loader is a :class:`~data_modules.resumable.ResumableLoader`: each epoch's queue,
  patch positions, shuffles, views and augmentation are a pure function of ``(seed, epoch, rank)``
  and never touch the model's random stream, and a run resumed from a mid-epoch checkpoint
  continues with exactly the batches the interrupted run would have seen.
* Views and augmentation run on each popped patch in the collate function. Validation uses fixed,
  seeded patches and views and no augmentation, so its loss is comparable across epochs.

Batch: ``{"image": B x C x D x H x W float32 (the first view; a view of ``views[:, 0]``),
"views": B x V x C x D x H x W (only when num_views > 1), "case_id": list[str]}``. The spatial
axes are the cached arrays' voxel axes (i, j, k), i.e. R, A, S for RAS-oriented presets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset

from .base import VolumeDataModule, source_argument
from .cache import (
    CachedVolume,
    MemoryMappedUniformSampler,
    decode_voxels,
    read_cached_array,
    volume_subject,
)
from .resumable import ResumableLoader
from .sources import Case, cases_from_csv, cases_from_datalist, cases_from_folder, combine_cases, split_by_subject
from .views import PatchAugmentation, ViewSampler, as_triple, build_view_sampler


def collate_views(samples: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> dict:
    """Batch of ``(case_id, views)`` items in the format the methods consume (see module docstring).

    Views are copied once into a preallocated ``B x V x ...`` tensor; ``image`` is a view of it.
    """
    num_views = len(samples[0][1])
    views = torch.empty((len(samples), num_views, *samples[0][1][0].shape), dtype=torch.float32)
    for item, (_, item_views) in enumerate(samples):
        if len(item_views) != num_views:
            raise ValueError(f"every item needs {num_views} views, item {item} has {len(item_views)}")
        for index, view in enumerate(item_views):
            views[item, index] = view
    batch = {"image": views[:, 0], "case_id": [case_id for case_id, _ in samples]}
    if num_views > 1:
        batch["views"] = views
    return batch


class PatchCollator:
    """``collate_fn`` for queue patches: views, then augmentation, drawn from its own generator."""

    def __init__(self, views: ViewSampler, augmentation: PatchAugmentation | None, seed: int):
        self.views = views
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, patches: Sequence[tio.Subject]) -> dict:
        samples = []
        for patch in patches:
            views = self.views(patch["image"].data, self.generator)
            if self.augmentation is not None:
                views = [self.augmentation(view, self.generator) for view in views]
            samples.append((patch["case_id"], views))
        return collate_views(samples)


class FixedPatchDataset(Dataset):
    """Deterministic patches for validation: positions and views depend only on ``seed`` and the index.

    Reads straight from the memory-mapped cache, so the same patches come back every epoch and
    validation losses are comparable across epochs.
    """

    def __init__(
        self,
        volumes: Sequence[CachedVolume],
        patch_size: tuple[int, int, int],
        samples_per_volume: int,
        views: ViewSampler,
        seed: int,
    ):
        self.volumes = list(volumes)
        self.patch_size = patch_size
        self.views = views
        self.seed = seed
        self.items: list[tuple[int, tuple[int, int, int]]] = []
        for index, volume in enumerate(self.volumes):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            ranges = [size - patch + 1 for size, patch in zip(volume.shape[1:], patch_size)]
            for _ in range(samples_per_volume):
                start = tuple(int(torch.randint(r, (1,), generator=generator)) for r in ranges)
                self.items.append((index, start))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[str, list[torch.Tensor]]:
        volume_index, (a, b, c) = self.items[index]
        volume = self.volumes[volume_index]
        array, _ = read_cached_array(volume.image)
        da, db, dc = self.patch_size
        # a view for a float32 cache (collate copies it once); decoded to float32 for a compact one
        patch = decode_voxels(array[:, a : a + da, b : b + db, c : c + dc], volume.image)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * index + 1)
        return volume.case_id, self.views(patch, generator)


class PretrainDataModule(VolumeDataModule):
    """Unlabelled 3D volumes -> patches for masked-image-modeling pre-training.

    Args:
        folder: folder searched recursively for NIfTI/NRRD/MHA/MHD files and DICOM series folders.
        csv: CSV with an ``image`` column (optional ``case_id``); paths relative to the CSV.
        datalist: MSD/MONAI ``dataset.json``; paths relative to it.
        datalist_key: section of ``datalist`` to use (``training``, ``validation``, ``test``).
            Sources can be combined; with none, the embedded phantom cohort is used (labels ignored).
        patch_size: size of the patch the queue cuts (the *context* patch when views are cropped).
        num_views: views per item; > 1 adds ``batch["views"]``.
        view_size: size of the views cropped inside the patch; None = the patch itself (1 view).
        samples_per_volume: patches per volume each time the queue loads it. Two independent crops of
            one volume as separate items (HybridMIM, Swin UNETR SSL) = this, not views.
        val_fraction: share of subjects held out for validation (by subject, from ``seed``).
        val_samples_per_volume: fixed patches per validation subject.
        augmentation: per-view flips / intensity jitter; None = none.
        **kwargs: the shared arguments of :class:`~data_modules.base.VolumeDataModule` (preprocessing,
            queue, workers, seed, cache, phantom cohort, data checks).
    """

    def __init__(
        self,
        folder: str | None = None,
        csv: str | None = None,
        datalist: str | None = None,
        datalist_key: str = "training",
        patch_size: int | tuple[int, int, int] = 96,
        num_views: int = 1,
        view_size: int | tuple[int, int, int] | None = None,
        samples_per_volume: int = 4,
        val_fraction: float = 0.1,
        val_samples_per_volume: int = 1,
        augmentation: PatchAugmentation | None = None,
        **kwargs: Any,
    ):
        super().__init__(folder=folder, csv=csv, datalist=datalist, patch_size=patch_size,
                         samples_per_volume=samples_per_volume, **kwargs)
        if val_samples_per_volume < 1:
            raise ValueError(f"val_samples_per_volume must be >= 1, got {val_samples_per_volume}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.datalist_key = datalist_key
        self.views = build_view_sampler(num_views, view_size)
        if view_size is not None and any(v > p for v, p in zip(as_triple(view_size, "view_size"), self.patch_size)):
            raise ValueError(f"view_size {view_size} must fit inside patch_size {self.patch_size}")
        self.val_fraction = val_fraction
        self.val_samples_per_volume = val_samples_per_volume
        self.augmentation = augmentation

    def discover(self) -> dict[str, list[Case]]:
        """All cases of the configured sources (combined), or of the phantom cohort when none is configured;
        training and validation are split after the checks (:meth:`make_splits`)."""
        groups = []
        if self.folder:
            with source_argument("folder"):
                groups.append(cases_from_folder(self.folder))
        if self.csv:
            with source_argument("csv"):
                groups.append(cases_from_csv(self.csv, with_labels=False))
        if self.datalist:
            with source_argument("datalist"):
                groups.append(cases_from_datalist(self.datalist, self.datalist_key, with_labels=False))
        if not groups:
            groups.append(cases_from_datalist(self.phantom_datalist(), "training", with_labels=False))
        return {"all": combine_cases(groups)}

    def make_splits(self, cached: dict[str, list[CachedVolume]]) -> dict[str, list[CachedVolume]]:
        """Split the usable cases by subject into train / validation (``val_fraction``, ``seed``)."""
        train, val = split_by_subject(cached["all"], self.val_fraction, self.seed)
        return {"train": train, "val": val}

    @property
    def train_volumes(self) -> list[CachedVolume] | None:
        """Training subjects' cache entries (None before :meth:`setup`)."""
        return None if self.splits is None else self.splits["train"]

    @property
    def val_volumes(self) -> list[CachedVolume]:
        """Validation subjects' cache entries (none before :meth:`setup`)."""
        return [] if self.splits is None else self.splits["val"]

    def build_train_loader(self, rank: int = 0, world_size: int = 1) -> ResumableLoader:
        """The training loader of one rank: a ``tio.Queue`` (sharded when ``world_size > 1``) in a DataLoader.

        Wrapped in a :class:`ResumableLoader`, which rebuilds the queue and the collate generator
        for each epoch from ``(seed, epoch, rank)`` (see the module docstring).
        """
        subjects = tio.SubjectsDataset([volume_subject(v) for v in self.split("train")], load_getitem=False)
        return self.queue_loader(subjects, MemoryMappedUniformSampler(self.patch_size),
                                 lambda seed: PatchCollator(self.views, self.augmentation, seed=seed), rank, world_size)

    def _fixed_loader(self) -> DataLoader | list:
        val_volumes = self.split("val")
        if not val_volumes:
            return []
        dataset = FixedPatchDataset(val_volumes, self.patch_size, self.val_samples_per_volume, self.views, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0, collate_fn=collate_views)

    def val_dataloader(self) -> DataLoader | list:
        """Fixed patches of the held-out subjects (every rank sees all of them)."""
        return self._fixed_loader()

    def test_dataloader(self) -> DataLoader | list:
        return self._fixed_loader()

    def predict_dataloader(self) -> DataLoader | list:
        return self._fixed_loader()

    @property
    def model_input_size(self) -> tuple[int, int, int]:
        """Spatial size of the tensors the model receives (the view size, else the patch size).

        The method base class compares it with the network's ``img_size`` before training starts.
        """
        return tuple(getattr(self.views, "view_size", self.patch_size))

    def describe(self) -> dict:
        """Data settings recorded with exported encoders."""
        return {
            **super().describe(),
            "num_views": self.views.num_views,
            "view_size": list(getattr(self.views, "view_size", self.patch_size)),
            "in_channels": self.in_channels,
            "num_cases": None if self.train_volumes is None else len(self.train_volumes) + len(self.val_volumes),
            "num_train_cases": None if self.train_volumes is None else len(self.train_volumes),
            "sources": {
                "folder": self.folder,
                "csv": self.csv,
                "datalist": self.datalist,
                "datalist_key": self.datalist_key if self.datalist else None,
                "phantoms": self.uses_phantoms,
            },
        }
