"""Segmentation data module: labelled volumes → label-aware training patches and whole evaluation volumes.

It shares its base with :class:`~data_modules.pretrain.PretrainDataModule`
(:class:`~data_modules.base.VolumeDataModule`): the same discovery (:mod:`.sources`), presets
(:mod:`.presets`), check → cache → selection (:mod:`.cache` also stores the nearest-neighbour-resampled
label maps and each case's original geometry) and per-rank TorchIO queue, set to the trainer's epoch
as each pass starts.

* Training: a ``tio.Queue`` per rank (``DistributedSampler`` over subjects under DDP) with a ``tio.LabelSampler`` that centres a patch on a
  foreground voxel with probability ``pos_neg_ratio / (1 + pos_neg_ratio)`` and on background
  otherwise — MONAI ``RandCropByPosNegLabel`` semantics (pos 1 : neg 1 by default), drawn from a
  binary foreground map so every foreground voxel is equally likely. Volumes are padded by half a
  patch first so foreground near the border can be a patch centre (and the map is never empty).
  Augmentation (:class:`SegmentationAugmentation`) runs on each popped patch, jointly on image and
  label.
* Validation / test / predict: whole preprocessed volumes, batch 1, fixed order. Under DDP each rank
  takes a disjoint slice (``cases[rank::world_size]``, no padding), so no volume is counted twice;
  the module gathers results by case id.
* Before caching, every case is checked (:mod:`.validation`: readable, 3D, finite, label geometry
  equal to its image's, label values within the declared classes); a bad case stops the run with
  every problem listed, or is dropped with ``on_bad_case: skip`` (see ``skipped_cases``).
* The training loader is a :class:`~data_modules.resumable.ResumableLoader` (patch stream a pure
  function of ``(seed, epoch, rank)``, resumable mid-epoch), as in the pre-training module.
* Label fractions: the labelled training subset is the first ``n`` cases of a permutation of the
  sorted case ids drawn from ``seed``: the same seed gives the same cases, and a smaller fraction's
  cases are always among a larger one's (nested subsets).

Batches: ``image`` ``B×C×D×H×W`` float32, ``label`` ``B×1×D×H×W`` int64 (when the case has one),
``case_id`` list; evaluation batches add ``spacing`` (``B×3`` mm of the preprocessed grid).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from .base import VolumeDataModule, source_argument
from .cache import CachedVolume, decode_voxels, read_cached_array, volume_subject
from .resumable import ResumableLoader
from .sources import (
    IMAGE_SUFFIXES,
    Case,
    DataSourceError,
    cases_from_csv,
    cases_from_datalist,
    cases_from_folder,
    combine_cases,
    image_suffix,
    split_by_subject,
    strip_image_suffix,
)

FOREGROUND_MAP = "foreground"


# --------------------------------------------------------------------------- cases
def cases_from_paired_folders(folder: str | Path) -> list[Case]:
    """Labelled cases of a folder: ``images/`` + ``labels/`` (or MSD's ``imagesTr/`` + ``labelsTr/``)
    matched by name, or images with their label maps side by side (``case_image.nii.gz`` +
    ``case_label.nii.gz``, ``case01/image.nii.gz`` + ``case01/seg.nii.gz``; see
    :func:`~data_modules.sources.cases_from_folder`). Every image needs its label map."""
    root = Path(folder).expanduser()
    for images_name, labels_name in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / images_name).is_dir() and (root / labels_name).is_dir():
            images = {c.case_id: c.image for c in cases_from_folder(root / images_name)}
            labels = {c.case_id: c.image for c in cases_from_folder(root / labels_name)}
            unmatched = sorted(set(images) ^ set(labels))
            if unmatched:
                raise DataSourceError(f"{root}: images and labels must pair up by name; unmatched: {', '.join(unmatched[:20])}")
            return [Case(case_id=key, image=images[key], label=labels[key]) for key in sorted(images)]
    cases = cases_from_folder(root, with_labels=True)
    unlabelled = [str(c.image) for c in cases if c.label is None]
    if unlabelled:
        raise DataSourceError(
            f"{root}: {len(unlabelled)} image(s) without a label map: {', '.join(unlabelled[:10])}. Put label maps beside "
            "their images named <name>_label / _seg / _mask (or in images/ + labels/ sub-folders), one per image"
        )
    return cases


def dataset_name(datalist: str | None = None, folder: str | None = None, csv: str | None = None,
                 phantom_cases: int = 12, phantom_shape: Sequence[int] = (160, 160, 64), phantom_seed: int = 0,
                 **_: Any) -> str:
    """A short name of the data a configuration reads, recorded with results so ``compare`` keeps
    data sets apart: the source's last two path parts, or the phantom cohort's settings. Accepts a
    data module's ``init_args`` as keyword arguments."""
    source = datalist or folder or csv
    if source:
        path = Path(source).expanduser()
        return "/".join(path.parts[-2:])
    return f"phantoms ({phantom_cases} cases {'x'.join(str(int(s)) for s in phantom_shape)} seed {phantom_seed})"


def labelled_subset(cases: Sequence[Any], fraction: float = 1.0, count: int | None = None, seed: int = 0) -> list[Any]:
    """The first ``count`` (or ``max(1, round(fraction·N))``) cases of a seeded permutation of the sorted ids.

    Deterministic and nested: for one seed, a smaller subset is a prefix of a larger one.
    """
    if count is None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
        count = max(1, round(fraction * len(cases)))
    if not 1 <= count <= len(cases):
        raise ValueError(f"num_labelled must be between 1 and the {len(cases)} training cases, got {count}")
    ordered = sorted(cases, key=lambda case: case.case_id)
    order = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    return [ordered[i] for i in order[:count]]


# --------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class SegmentationAugmentation:
    """Per-patch augmentation of the MONAI Swin UNETR BTCV recipe (methods.md §8.2), image and label jointly.

    Attributes:
        flip_prob: flip each spatial axis independently with this probability.
        rotate90_prob: rotate by k·90° (k ∈ {1, 2, 3}) in the plane of the first two spatial axes.
        intensity_scale, intensity_scale_prob: multiply by ``1 + U(−s, s)`` with this probability.
        intensity_shift, intensity_shift_prob: add ``U(−s, s)`` with this probability.
    """

    flip_prob: float = 0.2
    rotate90_prob: float = 0.2
    intensity_scale: float = 0.1
    intensity_scale_prob: float = 0.1
    intensity_shift: float = 0.1
    intensity_shift_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("flip_prob", "rotate90_prob", "intensity_scale_prob", "intensity_shift_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        def chance(p: float) -> bool:
            return p > 0 and float(torch.rand((), generator=generator)) < p

        def uniform(s: float) -> float:
            return s * (2 * float(torch.rand((), generator=generator)) - 1)

        flips = [axis for axis in (-3, -2, -1) if chance(self.flip_prob)]
        if flips:
            image, label = torch.flip(image, flips), torch.flip(label, flips)
        if chance(self.rotate90_prob):
            k = int(torch.randint(1, 4, (1,), generator=generator))
            image, label = torch.rot90(image, k, (-3, -2)), torch.rot90(label, k, (-3, -2))
        if chance(self.intensity_scale_prob):
            image = image * (1 + uniform(self.intensity_scale))
        if chance(self.intensity_shift_prob):
            image = image + uniform(self.intensity_shift)
        return image.contiguous(), label.contiguous()


class AddForegroundMap(tio.Transform):
    """Adds the binary ``label > 0`` map the label sampler draws patch centres from."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        label = subject["label"]
        subject.add_image(tio.LabelMap(tensor=(label.data > 0).to(torch.uint8), affine=label.affine), FOREGROUND_MAP)
        return subject


class SegmentationCollator:
    """``collate_fn`` for queue patches: augmentation from its own seeded generator, then stacking."""

    def __init__(self, augmentation: SegmentationAugmentation | None, seed: int) -> None:
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, patches: Sequence[tio.Subject]) -> dict[str, Any]:
        images, labels = [], []
        for patch in patches:
            image, label = patch["image"].data.float(), patch["label"].data.long()
            if self.augmentation is not None:
                image, label = self.augmentation(image, label, self.generator)
            images.append(image)
            labels.append(label)
        return {"image": torch.stack(images), "label": torch.stack(labels), "case_id": [p["case_id"] for p in patches]}


class VolumeDataset(Dataset):
    """Whole preprocessed volumes (image, label if cached, spacing) for evaluation and prediction."""

    def __init__(self, volumes: Sequence[CachedVolume]) -> None:
        self.volumes = list(volumes)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        volume = self.volumes[index]
        image, _ = read_cached_array(volume.image)
        item = {"image": decode_voxels(np.array(image), volume.image), "case_id": volume.case_id,
                "spacing": torch.tensor(volume.spacing, dtype=torch.float64)}
        if volume.label is not None:
            label, _ = read_cached_array(volume.label)
            item["label"] = torch.from_numpy(np.array(label, dtype=np.int64))
        return item


def collate_volumes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"case_id": [item["case_id"] for item in items]}
    for key in ("image", "label", "spacing"):
        if all(key in item for item in items):
            batch[key] = torch.stack([item[key] for item in items])
    return batch


# --------------------------------------------------------------------------- the module
class SegmentationDataModule(VolumeDataModule):
    """Labelled 3D volumes for fine-tuning and evaluation (see the module docstring for the data path).

    Args:
        datalist: MSD/MONAI ``dataset.json`` (BTCV's ``dataset_0.json``); class names from its ``labels``.
        train_key: its section of training cases.
        val_key: its section of validation cases; when absent from the file, ``val_fraction`` of the
            training cases are held out instead (by subject, from ``seed``).
        test_key: labelled section for ``test``; None = the validation cases (BTCV convention).
        predict_key: section for ``predict`` (labels optional); None = the test cases.
        predict_images: new images for ``predict``, no datalist needed: a folder (searched like a
            pre-training folder; label files are skipped), an image file, a DICOM series folder, or
            a list of these. At predict time only these are read; overrides ``predict_key``.
        folder: paired folders ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``), matched by name,
            or images and label maps side by side (see :func:`cases_from_paired_folders`).
        csv: CSV with ``image`` and ``label`` columns (optional ``case_id``). Sources other than a
            datalist with a validation section are split with ``val_fraction``. With no source, the
            embedded phantom cohort (with its organ labels and names) is used.
        patch_size: training patch size (= the model's ROI).
        queue_length: patches held by the queue.
        num_workers: queue workers, and preprocessing threads when the cache is cold.
        pos_neg_ratio: foreground : background patch centres (MONAI ``pos/neg``; 1 → half each).
        label_fraction: share of the training cases whose labels are used.
        num_labelled: number of labelled training cases (overrides ``label_fraction``).
        val_fraction: held-out share when the source has no validation section.
        class_names: names of classes 1..K (background excluded); default: the datalist's ``labels``.
        augmentation: per-patch augmentation; None = none.
        **kwargs: the shared arguments of :class:`~data_modules.base.VolumeDataModule` (preprocessing,
            queue, seed, cache, phantom cohort, data checks); use the pre-training run's preprocessing.
    """

    def __init__(
        self,
        datalist: str | None = None,
        train_key: str = "training",
        val_key: str = "validation",
        test_key: str | None = None,
        predict_key: str | None = None,
        predict_images: str | list[str] | None = None,
        folder: str | None = None,
        csv: str | None = None,
        patch_size: int | tuple[int, int, int] = 96,
        queue_length: int = 32,
        num_workers: int = 2,
        pos_neg_ratio: float = 1.0,
        label_fraction: float = 1.0,
        num_labelled: int | None = None,
        val_fraction: float = 0.2,
        class_names: list[str] | None = None,
        augmentation: SegmentationAugmentation | None = SegmentationAugmentation(),
        **kwargs: Any,
    ) -> None:
        super().__init__(folder=folder, csv=csv, datalist=datalist, patch_size=patch_size, queue_length=queue_length,
                         num_workers=num_workers, preprocess_workers=num_workers, **kwargs)
        if sum(bool(s) for s in (datalist, folder, csv)) > 1:
            raise ValueError("give one labelled source: datalist, folder or csv")
        if pos_neg_ratio < 0:
            raise ValueError(f"pos_neg_ratio must be >= 0, got {pos_neg_ratio}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        if num_labelled is not None and num_labelled < 1:
            raise ValueError(f"num_labelled must be >= 1, got {num_labelled}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if augmentation is not None and augmentation.rotate90_prob > 0 and self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"rotate90 needs equal patch sides on the first two axes, got {self.patch_size}; "
                             "set augmentation.rotate90_prob: 0")
        self.train_key, self.val_key = train_key, val_key
        self.test_key, self.predict_key = test_key, predict_key
        self.predict_images = [predict_images] if isinstance(predict_images, str) else predict_images
        self.pos_neg_ratio = pos_neg_ratio
        self.label_fraction, self.num_labelled = label_fraction, num_labelled
        self.val_fraction = val_fraction
        self._class_names = list(class_names) if class_names is not None else None
        self.augmentation = augmentation
        self.all_train_cases: list[Case] = []
        self._datalist_labels: dict[int, str] | None = None

    # ------------------------------------------------------------------ discovery
    def _predicting_new_images(self) -> bool:
        trainer = self.trainer
        return bool(self.predict_images) and trainer is not None and trainer.state.fn == TrainerFn.PREDICTING

    def new_image_cases(self) -> list[Case]:
        """The cases of ``predict_images``: every image of each folder (label files skipped), file or DICOM series."""
        groups = []
        with source_argument("predict_images"):
            for source in self.predict_images or []:
                path = Path(source).expanduser()
                if path.is_file() and image_suffix(path):
                    groups.append([Case(case_id=strip_image_suffix(path.name), image=path)])
                elif path.is_file():
                    raise DataSourceError(f"{path}: not a supported image file ({', '.join(IMAGE_SUFFIXES)}); "
                                          "pass a DICOM series as its folder")
                else:
                    groups.append(cases_from_folder(path))
        return combine_cases(groups)

    def discover(self) -> dict[str, list[Case]]:
        """Cases per split: ``train`` (labelled subset), ``val``, ``test``, ``predict``.

        When predicting ``predict_images``, only those are discovered (nothing else is read).
        """
        if self._predicting_new_images():
            return {"train": [], "val": [], "test": [], "predict": self.new_image_cases()}
        source = next((name for name in ("datalist", "folder", "csv") if getattr(self, name)), "phantom_root")
        with source_argument(source):
            train, val, test, predict = self._labelled_splits()
        if self.predict_images:
            predict = self.new_image_cases()
        self.all_train_cases = train
        labelled = labelled_subset(train, self.label_fraction, self.num_labelled, self.seed)
        return {"train": labelled, "val": val, "test": test, "predict": predict}

    def _labelled_splits(self) -> tuple[list[Case], list[Case], list[Case], list[Case]]:
        """(all training, validation, test, predict) cases of the labelled source (or the phantom cohort);
        no predict cases when ``predict_images`` replaces them."""
        datalist = Path(self.datalist).expanduser() if self.datalist else None
        if self.uses_phantoms:
            datalist = self.phantom_datalist()
        sections: list[str] = []
        if datalist is not None:
            train = cases_from_datalist(datalist, self.train_key)
            content = json.loads(datalist.read_text())
            sections = [k for k, v in content.items() if isinstance(v, list) and v]
            labels = content.get("labels")
            if isinstance(labels, dict):
                self._datalist_labels = {int(k): str(v) for k, v in labels.items()}
        elif self.folder:
            train = cases_from_paired_folders(self.folder)
        else:
            train = cases_from_csv(self.csv)
        unlabelled = [c.case_id for c in train if c.label is None]
        if unlabelled:
            raise DataSourceError(f"training cases without a label map: {', '.join(unlabelled[:20])}")
        if datalist is not None and self.val_key in sections:
            val = cases_from_datalist(datalist, self.val_key)
        else:
            train, val = split_by_subject(train, self.val_fraction, self.seed)
        test = cases_from_datalist(datalist, self.test_key) if self.test_key else val
        predict = [] if self.predict_images else cases_from_datalist(datalist, self.predict_key) if self.predict_key else test
        for name, group in (("validation", val), ("test", test)):
            if any(c.label is None for c in group):
                raise DataSourceError(f"every {name} case needs a label map (metrics); use predict_key for unlabelled cases")
        return train, val, test, predict

    def declared_classes(self) -> int | None:
        """Classes the label maps may hold: ``class_names`` + background, else the datalist's ``labels``
        (known after :meth:`discover`)."""
        if self._class_names is not None:
            return len(self._class_names) + 1
        if self._datalist_labels:
            return max(self._datalist_labels) + 1
        return None

    def make_splits(self, cached: dict[str, list[CachedVolume]]) -> dict[str, list[CachedVolume]]:
        """The cached splits, as discovered; says what they hold."""
        if self._predicting_new_images():
            rank_zero_info(f"segmentation data: {len(cached['predict'])} new image(s) to predict")
            return cached
        rank_zero_info(
            f"segmentation data: {len(cached['train'])} labelled training case(s) of {len(self.all_train_cases)} "
            f"(fraction {len(cached['train']) / max(len(self.all_train_cases), 1):.3g}, seed {self.seed}), "
            f"{len(cached['val'])} validation, {len(cached['test'])} test"
        )
        return cached

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def class_names(self) -> list[str]:
        """Names of all classes, background first (index = label value); known after :meth:`setup`.

        From ``class_names``, else the datalist's ``labels``, else ``class_<i>`` up to the largest
        label value found in the training and validation label maps.
        """
        if self._class_names is not None:
            return ["background", *self._class_names]
        if self._datalist_labels:
            top = max(self._datalist_labels)
            return [self._datalist_labels.get(i, f"class_{i}") for i in range(top + 1)]
        top = max((int(k) for v in self.split("train") + self.split("val")
                   for k in (v.meta["validation"]["label_voxels"] or {})), default=1)
        return ["background", *[f"class_{i}" for i in range(1, top + 1)]]

    @property
    def num_classes(self) -> int:
        """Output channels of the network: foreground classes + background."""
        return len(self.class_names)

    @property
    def labelled_case_ids(self) -> list[str]:
        return [v.case_id for v in self.split("train")]

    def original_geometry(self, case_id: str) -> dict[str, Any]:
        """Source image path and geometry (shape, affine, spacing, origin, direction) before preprocessing."""
        for group in (self.splits or {}).values():
            for volume in group:
                if volume.case_id == case_id:
                    return {"source": volume.meta["source"]["image"], **volume.meta["original"],
                            "preprocessed_affine": volume.meta["affine"]}
        raise KeyError(f"unknown case {case_id!r}")

    def describe(self) -> dict[str, Any]:
        """Data settings recorded with results (and in exported metadata)."""
        return {
            "dataset": dataset_name(self.datalist, self.folder, self.csv, self.phantom_cases, self.phantom_shape,
                                    self.phantom_seed),
            **super().describe(),
            # The fraction actually used (num_labelled / training cases), which result files report.
            "label_fraction": round(len(self.split("train")) / len(self.all_train_cases), 4)
            if self.splits and self.all_train_cases else self.label_fraction,
            "num_labelled": len(self.split("train")) if self.splits else self.num_labelled,
            "num_train_cases": len(self.all_train_cases) if self.splits else None,
            "labelled_cases": self.labelled_case_ids if self.splits else None,
            "seed": self.seed,
            "class_names": self.class_names if self.splits else None,
        }

    # ------------------------------------------------------------------ loaders
    def build_train_loader(self, rank: int = 0, world_size: int = 1) -> ResumableLoader:
        """One rank's training loader: a label-sampling queue per epoch, rebuilt from ``(seed, epoch, rank)``."""
        half = tuple(p // 2 for p in self.patch_size)
        transform = tio.Compose([AddForegroundMap(), tio.Pad(tuple(h for h in half for _ in (0, 1)), padding_mode="minimum")])
        subjects = tio.SubjectsDataset([volume_subject(v, with_label=True) for v in self.split("train")])
        pos = self.pos_neg_ratio / (1.0 + self.pos_neg_ratio)
        label_sampler = tio.LabelSampler(self.patch_size, FOREGROUND_MAP, {0: 1.0 - pos, 1: pos})
        return self.queue_loader(subjects, label_sampler, lambda seed: SegmentationCollator(self.augmentation, seed=seed),
                                 rank, world_size, subject_transform=transform)

    def volume_loader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Whole volumes of ``split``, batch 1, in order; rank ``r`` of ``w`` gets ``volumes[r::w]`` (no padding)."""
        volumes = self.split(split)[rank::world_size]
        return DataLoader(VolumeDataset(volumes), batch_size=1, shuffle=False, num_workers=0, collate_fn=collate_volumes)

    def _rank_loader(self, split: str) -> DataLoader:
        trainer = self.trainer
        return self.volume_loader(split) if trainer is None else self.volume_loader(split, trainer.global_rank, trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        return self._rank_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._rank_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._rank_loader("predict")
