"""What the pre-training and segmentation data modules share: one base, :class:`VolumeDataModule`.

Both modules read 3D volumes from the same sources (a folder, a CSV, a ``dataset.json``; with none,
the embedded phantom cohort), check and preprocess every case into the on-disk cache before the
first step, and train on a resumable, DDP-sharded TorchIO patch queue. The base owns all of that:

* the shared arguments and their validation (one message per bad argument, naming it);
* sources: a broken source's error names the argument it came from (``data.folder: ...``), and
  the phantom cohort stands in when no source is given;
* check → cache → selection (:meth:`VolumeDataModule.cached_splits`): every case each split needs
  is checked and preprocessed once (:mod:`data_modules.prepare`), bad ones handled by
  ``on_bad_case``; ``prepare_data`` and ``setup`` both run it, the second finds it done;
* the training stream (:meth:`VolumeDataModule.queue_loader`): per epoch, a
  :class:`~data_modules.patch_queue.KeptWorkersQueue` over the rank's subjects, batched by a
  collator seeded from ``(seed, epoch, rank)``, in a :class:`~data_modules.resumable.ResumableLoader`;
* the epoch hand-off, in one place (:meth:`VolumeDataModule.training_epoch`): each pass over the
  training data reads the trainer's current epoch when it starts (or, without a Trainer, the last
  :meth:`VolumeDataModule.set_epoch`). Lightning cannot reach the ``DistributedSampler`` nested in
  the queue, and no LightningModule hook is needed to tell the data module the epoch;
* the data settings recorded with results and exported encoders (:meth:`VolumeDataModule.describe`).

A subclass says which cases each split has (:meth:`VolumeDataModule.discover`), how the cached
splits become its splits (:meth:`VolumeDataModule.make_splits`), and builds its training loader
with :meth:`VolumeDataModule.queue_loader`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torchio as tio
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, DistributedSampler

from .cache import STORAGE_FORMATS, CachedVolume, CacheStorage
from .patch_queue import KeptWorkersQueue, kept_subjects_loader
from .phantoms import ensure_phantom_cohort
from .prepare import prepare_and_select
from .presets import Preprocessing, resolve_preprocessing
from .resumable import ResumableLoader, derive_seed, lightning_batches_used
from .sources import Case, DataSourceError
from .validation import ON_BAD_CASE_CHOICES, OnBadCase, ValidationLimits, ValidationSettings
from .views import as_triple


@contextmanager
def source_argument(argument: str) -> Iterator[None]:
    """Prefix a broken source's error with the argument that named it (``data.folder: <path>: ...``)."""
    try:
        yield
    except DataSourceError as error:
        raise DataSourceError(f"data.{argument}: {error}") from error


def unique_cases(splits: dict[str, list[Case]]) -> list[Case]:
    """Every case of the splits once, in order of first appearance (a case may serve several splits)."""
    unique: dict[str, Case] = {}
    for group in splits.values():
        for case in group:
            unique.setdefault(case.case_id, case)
    return list(unique.values())


class VolumeDataModule(L.LightningDataModule):
    """Base of the data modules that train on patches of cached 3D volumes (see the module docstring).

    A subclass lists its own arguments (and the shared ones whose default or meaning differs) and passes
    the rest here through ``**kwargs``; LightningCLI follows that call, so these arguments appear in
    every subclass's configuration under the same names.

    Args:
        folder, csv, datalist: the sources (each subclass says what it reads from them).
        preprocessing: preset name (see ``data_modules.presets.PRESETS``) or full settings; use the
            pre-training run's for fine-tuning. Its ``pad_to`` is raised to at least ``patch_size`` so
            every patch fits.
        patch_size: size of the training patch the queue cuts.
        samples_per_volume: patches per volume each time the queue loads it (MONAI recipe: 4).
        queue_length: patches the queue buffers and shuffles; several times samples_per_volume mixes
            subjects within each batch.
        batch_size: items per batch (per rank).
        num_workers: worker processes of the queue's subject loader. Default 0: with the memory-mapped
            cache the workers would only pass tiny unloaded subjects (patches are cut in the main
            process, as TorchIO's queue always does), while re-forking them every epoch and the
            copy-on-write faults it causes cut throughput by half or more on a 2-core machine.
        preprocess_workers: threads that check and preprocess a cold cache (0 or 1 = one at a time).
        seed: the held-out split, the labelled subset, fixed validation patches and the patch
            augmentation (offset per rank).
        cache_dir: preprocessed-volume cache; default ``$LMIM_CACHE_DIR`` or
            ``~/.cache/lightning_mim/preprocessed``.
        in_channels: channels per image; 4D files are accepted only when this is > 1.
        phantom_root: where the phantom cohort is generated (default ``$LMIM_DATA_DIR`` or
            ``~/.cache/lightning_mim/phantoms``); it is used when no source is given.
        phantom_cases: number of phantom cases.
        phantom_shape: phantom volume size in voxels.
        phantom_seed: phantom cohort seed.
        on_bad_case: ``error`` (default): a case failing the data checks stops the run before the
            first step, with every bad case listed; ``skip``: train without them - they are listed in
            ``skipped_cases``, the run's log and the W&B config (a labelled subset may then hold fewer
            cases).
        validation_limits: plausibility limits of the data checks (spacing range, maximum size,
            minimum size relative to the ROI, label/image geometry tolerance); None = defaults.
        cache_storage: how the cache stores intensities - ``float32`` (exact, 4 bytes/voxel),
            ``float16`` or ``int16`` (2 bytes/voxel; precision in ``data_modules.cache.STORAGE_FORMATS``),
            or one of them compressed losslessly with Blosc2 (``float32_blosc2``, ``float16_blosc2``,
            ``int16_blosc2``: a patch decompresses only the 32³ blocks it covers). Part of the cache
            key: entries of each format coexist. Label maps are always stored exactly.
    """

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every constructor argument a configuration may set: the subclass's own and, through its
        ``**kwargs``, this base's."""
        names = set()
        for klass in (cls, VolumeDataModule):
            for name, parameter in inspect.signature(klass.__init__).parameters.items():
                if name != "self" and parameter.kind is not inspect.Parameter.VAR_KEYWORD:
                    names.add(name)
        return names

    def __init__(
        self,
        *,
        folder: str | None = None,
        csv: str | None = None,
        datalist: str | None = None,
        preprocessing: str | Preprocessing = "ct_abdomen_btcv",
        patch_size: int | tuple[int, int, int] = 96,
        samples_per_volume: int = 4,
        queue_length: int = 64,
        batch_size: int = 2,
        num_workers: int = 0,
        preprocess_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        in_channels: int = 1,
        phantom_root: str | None = None,
        phantom_cases: int = 12,
        phantom_shape: tuple[int, int, int] = (160, 160, 64),
        phantom_seed: int = 0,
        on_bad_case: OnBadCase = "error",
        validation_limits: ValidationLimits | None = None,
        cache_storage: CacheStorage = "float32",
    ) -> None:
        super().__init__()
        if cache_storage not in STORAGE_FORMATS:
            raise ValueError(f"cache_storage must be one of {STORAGE_FORMATS}, got {cache_storage!r}")
        if on_bad_case not in ON_BAD_CASE_CHOICES:
            raise ValueError(f"on_bad_case must be one of {ON_BAD_CASE_CHOICES}, got {on_bad_case!r}")
        for name, value, minimum in (
            ("samples_per_volume", samples_per_volume, 1),
            ("queue_length", queue_length, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("preprocess_workers", preprocess_workers, 0),
            ("in_channels", in_channels, 1),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        self.folder, self.csv, self.datalist = folder, csv, datalist
        self.patch_size = as_triple(patch_size, "patch_size")
        self.preprocessing = resolve_preprocessing(preprocessing).with_min_size(self.patch_size)
        self.samples_per_volume = samples_per_volume
        self.queue_length = queue_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.preprocess_workers = preprocess_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.cache_storage = cache_storage
        self.in_channels = in_channels
        self.phantom_root = phantom_root
        self.phantom_cases = phantom_cases
        self.phantom_shape = tuple(phantom_shape)
        self.phantom_seed = phantom_seed
        self.on_bad_case = on_bad_case
        self.validation_limits = validation_limits
        #: The cases ``on_bad_case: skip`` left out (the CLI records them in the run folder and W&B).
        self.skipped_cases: list[dict] = []
        #: Cache entries per split, set by :meth:`setup`.
        self.splits: dict[str, list[CachedVolume]] | None = None
        self._selection: tuple | None = None
        self._epoch = 0

    # ------------------------------------------------------------------ sources
    @property
    def uses_phantoms(self) -> bool:
        """True when no source is configured: the embedded phantom cohort is read."""
        return not (self.folder or self.csv or self.datalist)

    def phantom_datalist(self) -> Path:
        """The phantom cohort's ``dataset.json``, generated on first use."""
        return ensure_phantom_cohort(self.phantom_root, self.phantom_cases, self.phantom_shape, seed=self.phantom_seed,
                                     report=rank_zero_info)

    def discover(self) -> dict[str, list[Case]]:
        """The cases of each split this configuration reads (read sources inside :func:`source_argument`)."""
        raise NotImplementedError

    def declared_classes(self) -> int | None:
        """Classes (background included) the labels may hold, for the data checks; None = no labels checked."""
        return None

    # ------------------------------------------------------------------ check -> cache -> selection
    def validation_settings(self) -> ValidationSettings:
        """What every case is checked against (see :mod:`data_modules.validation`)."""
        return ValidationSettings.for_preprocessing(self.preprocessing, self.patch_size, self.in_channels,
                                                    self.declared_classes(), self.validation_limits)

    def cases_to_check(self) -> list[Case]:
        """Every case this configuration would read, once (what ``check-data`` and ``preprocess`` go through)."""
        return unique_cases(self.discover())

    def cached_splits(self) -> dict[str, list[CachedVolume]]:
        """Each split's cache entries: every case checked and preprocessed on one decode (once per case list),
        bad ones handled by ``on_bad_case`` (their summaries in :attr:`skipped_cases`)."""
        with isolate_rng():  # whether the cache was warm must not change the training's random stream
            splits = self.discover()
            cases = unique_cases(splits)  # after discover: the declared classes may come from the datalist
            if self._selection is None or self._selection[0] != cases:
                volumes, skipped = prepare_and_select(
                    cases, self.validation_settings(), self.preprocessing, self.on_bad_case, self.cache_dir,
                    self.cache_storage, self.preprocess_workers, rank_zero_info, rank_zero_warn)
                self._selection = (cases, volumes, skipped)
            _, volumes, self.skipped_cases = self._selection
        by_id = {volume.case_id: volume for volume in volumes}
        return {name: [by_id[case.case_id] for case in group if case.case_id in by_id] for name, group in splits.items()}

    def make_splits(self, cached: dict[str, list[CachedVolume]]) -> dict[str, list[CachedVolume]]:
        """This module's splits from :meth:`cached_splits` (subclasses split or log here)."""
        return cached

    def prepare_data(self) -> None:
        """Generate the phantoms if needed and fill the cache (Lightning runs this once per node)."""
        self.cached_splits()

    def setup(self, stage: str | None = None) -> None:
        """Load the cache index (filling any gap) and make the splits, once."""
        if self.splits is None:
            self.splits = self.make_splits(self.cached_splits())

    def split(self, name: str) -> list[CachedVolume]:
        """The cache entries of split ``name``."""
        if self.splits is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its data are read")
        return self.splits[name]

    def describe(self) -> dict[str, Any]:
        """Data settings recorded with results and exported encoders (subclasses add theirs)."""
        return {
            "modality": self.preprocessing.modality,
            "preprocessing": self.preprocessing.to_dict(),
            "spacing": None if self.preprocessing.spacing is None else list(self.preprocessing.spacing),
            "patch_size": list(self.patch_size),
        }

    # ------------------------------------------------------------------ the training stream
    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass over the training data when no Trainer runs this module (benchmarks,
        tests); under a Trainer its current epoch is read instead (:meth:`training_epoch`)."""
        self._epoch = int(epoch)

    def training_epoch(self) -> int:
        """The epoch a new pass over the training data belongs to - the only place it reaches the stream:
        the trainer's current epoch, else the last :meth:`set_epoch`."""
        trainer = self.trainer
        return trainer.current_epoch if trainer is not None else self._epoch

    def build_train_loader(self, rank: int = 0, world_size: int = 1) -> ResumableLoader:
        """One rank's training loader; each data module builds its subjects and calls :meth:`queue_loader`."""
        raise NotImplementedError

    def queue_loader(self, subjects: tio.SubjectsDataset, patch_sampler: tio.data.PatchSampler,
                     make_collate: Callable[[int], Callable[[list], Any]], rank: int = 0,
                     world_size: int = 1, subject_transform: tio.Transform | None = None) -> ResumableLoader:
        """The rank's resumable loader: per epoch, a queue of ``patch_sampler`` patches over the rank's
        subjects (a ``DistributedSampler`` shard, reshuffled per epoch, when ``world_size > 1``),
        batched by ``make_collate(seed)``. Give the subjects' transform as ``subject_transform``, not
        in ``subjects``: the queue applies it in this process (see :class:`KeptWorkersQueue`)."""
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(subjects, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed,
                                         drop_last=False)
        subjects_loader = kept_subjects_loader(subjects, sampler, self.num_workers, derive_seed(self.seed, rank, 2))

        def epoch_loader(epoch: int) -> DataLoader:
            if sampler is not None:
                sampler.set_epoch(epoch)
            queue = KeptWorkersQueue(  # its subject pass starts inside the epoch's random stream
                subjects_loader,
                subject_transform,
                max_length=self.queue_length,
                samples_per_volume=self.samples_per_volume,
                sampler=patch_sampler,
                subject_sampler=sampler,  # the queue counts the epoch's patches from it
                shuffle_subjects=False,  # the kept loader shuffles
                shuffle_patches=True,
            )
            collate = make_collate(derive_seed(self.seed, epoch, rank, 1))
            return DataLoader(queue, batch_size=self.batch_size, num_workers=0, collate_fn=collate)

        return ResumableLoader(epoch_loader, self.seed, rank, self.training_epoch,
                               lambda: lightning_batches_used(self.trainer))

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        if trainer is None:
            return self.build_train_loader()
        return self.build_train_loader(rank=trainer.global_rank, world_size=trainer.world_size)
