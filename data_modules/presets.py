"""Intensity and geometry preprocessing presets (methods.md §2.1), applied once per volume.

A :class:`Preprocessing` is plain data: every choice is a field, so a config file can state it
fully, and ``to_dict()``/``fingerprint()`` make it a cache key. ``apply()`` runs it with TorchIO
transforms on a subject whose keys are ``image`` (``tio.ScalarImage``) and optionally ``label``
(``tio.LabelMap``, always resampled nearest-neighbour and never intensity-transformed).

Order: orientation -> resampling -> foreground crop -> intensity -> padding. The foreground
threshold is therefore in the *input* intensity unit (HU for CT). Padding fills images with the
background of the intensity mode (the window's output minimum, 0 for z-scores, the image minimum
for ``none``; never the minimum after a foreground crop, which may be tissue) and labels with 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torchio as tio

Modality = Literal["ct", "mri", "pet"]
Intensity = Literal["window", "zscore_nonzero", "suv_zscore", "none"]
Interpolation = Literal["linear", "bspline", "nearest"]


class PreprocessingError(ValueError):
    """A volume cannot be preprocessed with the given settings (message says why)."""


def _as_tuple(value, length: int, cast, name: str):
    if value is None:
        return None
    items = tuple(cast(v) for v in (value if isinstance(value, (list, tuple)) else [value] * length))
    if len(items) != length:
        raise ValueError(f"Preprocessing.{name} needs {length} values, got {value!r}")
    return items


@dataclass(frozen=True)
class Preprocessing:
    """How a raw volume becomes a cached, training-ready array.

    Attributes:
        modality: ``ct``, ``mri`` or ``pet``; recorded in exported-encoder metadata.
        orientation: target axis codes (``"RAS"`` uses ``tio.ToCanonical``); None keeps the file's.
        spacing: target voxel size in mm (``tio.Resample``); None keeps the native spacing.
        image_interpolation: interpolation of images when resampling (labels: always nearest).
        intensity: ``window`` = clip to ``window`` then rescale to ``output_range``;
            ``zscore_nonzero`` = per-channel z-score over non-zero voxels, zeros stay 0 (MONAI's
            ``NormalizeIntensity(nonzero=True, channel_wise=True)``); ``suv_zscore`` = clip SUV to
            ``suv_clip`` then the same z-score; ``none`` = unchanged.
        window: input intensity window (HU for CT) used by ``window``.
        output_range: output range of ``window``.
        suv_clip: SUV clipping range used by ``suv_zscore``.
        crop_foreground: crop to the bounding box of voxels above ``foreground_threshold``
            (any channel), measured in input units before the intensity step. MONAI's
            ``CropForeground`` after a [-175, 250] window keeps HU > -175, hence the presets.
        foreground_threshold: see ``crop_foreground``.
        pad_to: pad (never crop) each axis to at least this size so patches always fit.
    """

    modality: Modality = "ct"
    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    image_interpolation: Interpolation = "linear"
    intensity: Intensity = "window"
    window: tuple[float, float] = (-175.0, 250.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    suv_clip: tuple[float, float] = (0.0, 20.0)
    crop_foreground: bool = False
    foreground_threshold: float = -175.0
    pad_to: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        # Config files deliver lists; normalise so equal settings give equal dicts and hashes.
        set_field = object.__setattr__
        set_field(self, "spacing", _as_tuple(self.spacing, 3, float, "spacing"))
        set_field(self, "window", _as_tuple(self.window, 2, float, "window"))
        set_field(self, "output_range", _as_tuple(self.output_range, 2, float, "output_range"))
        set_field(self, "suv_clip", _as_tuple(self.suv_clip, 2, float, "suv_clip"))
        set_field(self, "pad_to", _as_tuple(self.pad_to, 3, int, "pad_to"))
        set_field(self, "foreground_threshold", float(self.foreground_threshold))
        if self.orientation is not None:
            code = self.orientation.upper()
            axes = {"R": "x", "L": "x", "A": "y", "P": "y", "S": "z", "I": "z"}
            if len(code) != 3 or any(c not in axes for c in code) or len({axes[c] for c in code}) != 3:
                raise ValueError(f"Preprocessing.orientation must be 3 axis codes like 'RAS', got {self.orientation!r}")
            set_field(self, "orientation", code)
        if self.spacing is not None and min(self.spacing) <= 0:
            raise ValueError(f"Preprocessing.spacing must be positive, got {self.spacing}")
        for name in ("window", "output_range", "suv_clip"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"Preprocessing.{name} must be (low, high) with low < high, got {(low, high)}")
        if self.pad_to is not None and min(self.pad_to) < 1:
            raise ValueError(f"Preprocessing.pad_to must be positive, got {self.pad_to}")

    def to_dict(self) -> dict:
        """JSON-friendly field dict (tuples as lists); also the exported-encoder metadata."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """Stable hash of the settings, part of every cache key."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def with_min_size(self, size: tuple[int, int, int]) -> Preprocessing:
        """Same settings, padding every axis to at least ``size`` (e.g. the patch size)."""
        current = self.pad_to or (1, 1, 1)
        return dataclasses.replace(self, pad_to=tuple(max(a, int(b)) for a, b in zip(current, size)))

    def apply(self, subject: tio.Subject) -> tio.Subject:
        """Run the preprocessing on a loaded subject (``image`` and optional ``label``), in place.

        The transforms edit ``subject`` rather than deep-copy it first (TorchIO's default): the
        copies cost as much as the intensity step on a small volume.
        """
        if self.orientation == "RAS":
            subject = tio.ToCanonical(copy=False)(subject)
        elif self.orientation is not None:
            subject = tio.ToOrientation(self.orientation, copy=False)(subject)
        if self.spacing is not None:
            _to_itk_memory_order(subject)
            subject = tio.Resample(self.spacing, image_interpolation=self.image_interpolation, copy=False)(subject)
        if self.crop_foreground:
            subject = _crop_to_foreground(subject, self.foreground_threshold)
        subject = self._normalise_intensity(subject)
        if self.pad_to is not None:
            target = tuple(max(n, p) for n, p in zip(subject.spatial_shape, self.pad_to))
            if target != tuple(subject.spatial_shape):
                # Same centred bounds for image and label, applied with tio.Pad: CropOrPad re-checks that
                # all images share one space, which fails once the image alone has been padded.
                gaps = [t - n for n, t in zip(subject.spatial_shape, target)]
                bounds = [b for gap in gaps for b in (gap // 2, gap - gap // 2)]
                subject = tio.Pad(bounds, padding_mode=self._background, include=["image"], copy=False)(subject)
                if "label" in subject:
                    subject = tio.Pad(bounds, padding_mode=0, include=["label"], copy=False)(subject)
        return subject

    @property
    def _background(self) -> float | str:
        """Image padding value: what air / outside the body maps to after the intensity step."""
        if self.intensity == "window":
            return self.output_range[0]
        if self.intensity in ("zscore_nonzero", "suv_zscore"):
            return 0.0
        return "minimum"

    def _normalise_intensity(self, subject: tio.Subject) -> tio.Subject:
        if self.intensity == "window":
            # TorchIO's Clamp + RescaleIntensity(in_min_max=window), the same float32 operations in the
            # same order (so the same values), without their copies and the percentile pass over all voxels.
            low, high = self.window
            out_low, out_high = self.output_range
            image = subject["image"]
            array = image.data.clamp(low, high).float().numpy()
            array -= low
            array /= high - low
            array *= out_high - out_low
            array += out_low
            image.set_data(torch.from_numpy(array))
            return subject
        if self.intensity == "suv_zscore":
            subject = tio.Clamp(*self.suv_clip)(subject)
        if self.intensity in ("zscore_nonzero", "suv_zscore"):
            image = subject["image"]
            image.set_data(_zscore_nonzero(image.data.float(), str(image.path)))
        return subject


def _to_itk_memory_order(subject: tio.Subject) -> None:
    """Lay each volume out in memory as SimpleITK stores it (the same values, other strides).

    TorchIO hands SimpleITK the axis-reversed view of the (C, I, J, K) array; unless that view is
    contiguous, SimpleITK copies it element by element (18 ms for a 160 x 160 x 64 float32 volume,
    against 6 ms for torch's copy here and 0.7 ms for SimpleITK's then contiguous one).
    """
    for image in subject.get_images(intensity_only=False):
        data = image.data
        if data.shape[0] == 1 and not data[0].permute(2, 1, 0).is_contiguous():
            image.set_data(data.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1))


def _zscore_nonzero(data: torch.Tensor, where: str) -> torch.Tensor:
    """Per-channel z-score from the non-zero voxels; zero voxels (background) stay 0."""
    channels = []
    for channel in data:
        mask = channel != 0
        normalised = tio.ZNormalization.znorm(channel[None], mask[None]) if mask.any() else None
        if normalised is None:
            raise PreprocessingError(f"{where}: z-score impossible, non-zero voxels are constant or absent")
        channels.append(torch.where(mask[None], normalised, torch.zeros(())))
    return torch.cat(channels)


def _crop_to_foreground(subject: tio.Subject, threshold: float) -> tio.Subject:
    """Crop all images to the bounding box of image voxels above ``threshold`` (TorchIO has no such transform)."""
    mask = (subject["image"].data > threshold).any(dim=0).numpy()
    if not mask.any():
        raise PreprocessingError(
            f"{subject['image'].path}: no voxel above the foreground threshold {threshold}; "
            "wrong modality/preset, or set crop_foreground=false"
        )
    cropping = []
    for axis, size in enumerate(mask.shape):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        cropping += [int(present[0]), int(size - 1 - present[-1])]
    return tio.Crop(tuple(cropping), copy=False)(subject)


_CT_WINDOW = dict(modality="ct", intensity="window", window=(-175.0, 250.0), output_range=(0.0, 1.0))
_CT_WIDE = dict(modality="ct", intensity="window", window=(-1000.0, 1000.0), foreground_threshold=-1000.0)

#: Every preset states its orientation (the README's preset table is checked against this dict).
PRESETS: dict[str, Preprocessing] = {
    # SMIT/SwinUNETR/UNETR BTCV fine-tuning, SelfMedMAE.
    "ct_abdomen_btcv": Preprocessing(
        **_CT_WINDOW, orientation="RAS", spacing=(1.5, 1.5, 2.0), crop_foreground=True, foreground_threshold=-175.0
    ),
    # SMIT pre-training: 2 mm isotropic, pad to the 128³ context crop. RAS like the fine-tuning presets, so
    # the encoder never sees axes flipped relative to fine-tuning (SMIT's own code keeps the file's order).
    "ct_smit_pretrain": Preprocessing(
        **_CT_WINDOW,
        orientation="RAS",
        spacing=(2.0, 2.0, 2.0),
        crop_foreground=True,
        foreground_threshold=-175.0,
        pad_to=(128, 128, 128),
    ),
    # Swin UNETR self-supervised pre-training: native spacing, wide window.
    "ct_wide_pretrain": Preprocessing(
        **_CT_WIDE, orientation="RAS", output_range=(0.0, 1.0), crop_foreground=True, pad_to=(96, 96, 96)
    ),
    # HybridMIM: the same with output range [0.001, 1].
    "ct_hybridmim_pretrain": Preprocessing(
        **_CT_WIDE, orientation="RAS", output_range=(0.001, 1.0), crop_foreground=True, pad_to=(96, 96, 96)
    ),
    # Framework defaults (not specified by the method repositories).
    "mri_zscore": Preprocessing(
        modality="mri", orientation="RAS", intensity="zscore_nonzero", crop_foreground=True, foreground_threshold=0.0
    ),
    "pet_suv": Preprocessing(modality="pet", orientation="RAS", intensity="suv_zscore", suv_clip=(0.0, 20.0)),
}


def preset(name: str) -> Preprocessing:
    """The named preset; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing preset {name!r}; choose one of {sorted(PRESETS)}") from None


def resolve_preprocessing(value: str | Preprocessing) -> Preprocessing:
    """A preset name or a full :class:`Preprocessing` (as the CLI may give either)."""
    return preset(value) if isinstance(value, str) else value
