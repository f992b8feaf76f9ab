"""Case checks run before training: by ``python -m lightning_mim check-data`` and by the data modules.

A case is checked on its raw files, in an order that never reads what cannot be read safely:

1. the file itself: exists, is a regular file (a FIFO would block a reader forever, a dangling
   symlink or a folder named ``*.nii.gz`` is a broken export), can be opened, is not empty, has a
   supported type;
2. its header only (SimpleITK ``ReadImageInformation``): 3D, one volume per declared channel,
   spacing positive and plausible, size plausible both as stored and after resampling to the
   preset's spacing, and large enough for the ROI. A header claiming 100000³ voxels or a spacing
   of 1e6 mm is rejected here, before anything allocates or resamples it;
3. the voxels (through :func:`~data_modules.sources.read_image_as_stored`, which also catches
   truncated or corrupt files on the same decode): finite - as ITK's reader silently turns NaN and
   Inf into 0, a floating-point NIfTI file whose decode does not reproduce the stored bytes is read
   again with NiBabel for this -, not constant, something above the foreground
   threshold when the preset crops to the foreground;
4. a label map: the same file and header checks, the same geometry as its image (size, spacing,
   origin, direction, within ``geometry_atol`` mm / ``geometry_rtol``), integer values in the
   declared classes ``0..num_classes-1``, and some foreground.

Steps 3 and 4 run on the decode that preprocessing then reuses (:mod:`data_modules.prepare`):
training reads each file once. Checks of the decoded voxels are the functions in
:data:`IMAGE_CHECKS` / :data:`LABEL_CHECKS`.

Every problem is reported as ``<file>: <problem>``; a case's problems are all collected, and so
are all bad cases, so one run of the checks tells everything that is wrong.

Results of good cases are cached in the preprocessed-volume cache (``meta.json``'s
``validation.checks``; ``checks.json`` in the entry folder while the case is not preprocessed
yet), under the cache's own key and a fingerprint of the check settings: a second ``fit`` or
``check-data`` on the same files re-reads only what changed. Bad cases are re-checked every time
(they are what the user is fixing).

``on_bad_case`` (a data-module argument) decides what a bad case does: ``error`` (default) stops
before the first step with ONE :class:`~data_modules.sources.DataSourceError` listing every bad
case, its file and its problem; ``skip`` drops them, and the data module exposes what it dropped
as ``skipped_cases`` (logged, and recorded in the run folder and the W&B config by the CLI).
Problems of the *source* itself - a missing or empty folder, a folder without usable images, a
folder mixing DICOM series, a malformed ``dataset.json``/CSV entry, a listed file that does not
exist - are raised by :mod:`data_modules.sources` during discovery and are always errors, also
with ``skip``: they mean the dataset description is wrong, and skipping would silently train on
a different dataset than the one described.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch

from .cache import cache_key, cached_validation, default_cache_dir, entry_dir, record_validation
from .presets import Preprocessing
from .sources import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    Case,
    DataSourceError,
    _is_dicom_file,
    image_suffix,
    read_image_as_stored,
    read_label,
)

VALIDATION_VERSION = 2  # 2: images that look like label maps are bad cases
OnBadCase = Literal["error", "skip"]
ON_BAD_CASE_CHOICES = ("error", "skip")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationLimits:
    """What counts as a plausible medical volume (defaults cover CT, MRI and PET).

    Attributes:
        min_spacing_mm, max_spacing_mm: voxel size range per axis.
        max_axis_voxels: largest size per axis, as stored and after resampling.
        max_voxels: largest number of voxels, as stored and after resampling.
        min_roi_fraction: after resampling, every axis must hold at least this fraction of the ROI
            (smaller volumes would be mostly padding).
        geometry_atol, geometry_rtol: tolerances (mm, relative) for label/image spacing, origin and
            direction; those of the cache's own alignment check.
    """

    min_spacing_mm: float = 0.01
    max_spacing_mm: float = 50.0
    max_axis_voxels: int = 4096
    max_voxels: int = 2**31
    min_roi_fraction: float = 0.25
    geometry_atol: float = 1e-3
    geometry_rtol: float = 1e-5


@dataclass(frozen=True)
class ValidationSettings:
    """Everything a case is checked against; its :meth:`fingerprint` keys cached results."""

    roi_size: tuple[int, int, int]
    channels: int = 1
    target_spacing: tuple[float, float, float] | None = None
    num_classes: int | None = None
    foreground_threshold: float | None = None
    limits: ValidationLimits = ValidationLimits()

    @classmethod
    def for_preprocessing(
        cls,
        preprocessing: Preprocessing,
        roi_size: Sequence[int],
        channels: int = 1,
        num_classes: int | None = None,
        limits: ValidationLimits | None = None,
    ) -> ValidationSettings:
        return cls(
            roi_size=tuple(int(v) for v in roi_size),
            channels=int(channels),
            target_spacing=None if preprocessing.spacing is None else tuple(float(s) for s in preprocessing.spacing),
            num_classes=num_classes,
            foreground_threshold=preprocessing.foreground_threshold if preprocessing.crop_foreground else None,
            limits=limits or ValidationLimits(),
        )

    def fingerprint(self) -> str:
        description = {"version": VALIDATION_VERSION, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CaseReport:
    """The outcome of checking one case; ``problems`` holds ``<file>: <problem>`` lines."""

    case_id: str
    image: str
    label: str | None = None
    problems: list[str] = field(default_factory=list)
    shape: list[int] | None = None
    spacing: list[float] | None = None
    intensity: list[float] | None = None
    label_values: list[int] | None = None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: str | os.PathLike, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def record(self, settings: ValidationSettings) -> dict[str, Any]:
        """What the cache stores for a good case."""
        return {"fingerprint": settings.fingerprint(), "ok": self.ok, "shape": self.shape, "spacing": self.spacing,
                "intensity": self.intensity, "label_values": self.label_values}

    def summary(self) -> dict[str, Any]:
        """Plain description of a bad case (logged, written to the run folder and the W&B config)."""
        return {"case_id": self.case_id, "image": self.image, "label": self.label, "problems": list(self.problems)}


# --------------------------------------------------------------------------- files and headers
@dataclass(frozen=True)
class Header:
    """Geometry as SimpleITK reports it (LPS world, x/y/z order), read without the voxels."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int

    @classmethod
    def of_file(cls, path: Path) -> Header:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise DataSourceError(f"{path}: header cannot be read ({reason[:200]})") from error
        return cls(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(),
                   reader.GetNumberOfComponents())

    @classmethod
    def of_image(cls, image: sitk.Image) -> Header:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                   image.GetNumberOfComponentsPerPixel())

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return tuple(self.size[:3])

    @property
    def spatial_spacing(self) -> tuple[float, ...]:
        return tuple(self.spacing[:3])


def _format(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _file_type_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image file or DICOM folder, without opening anything risky."""
    try:
        link = path.lstat()
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be inspected ({error.strerror or error})"
    if stat.S_ISLNK(link.st_mode) and not path.exists():
        return f"is a dangling symbolic link (to {os.readlink(path)})"
    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        if image_suffix(path) or path.suffix.lower() in DICOM_SUFFIXES:
            return "is a folder, but its name says it is an image file"
        return None  # a DICOM series folder; its series are checked when it is read
    if not stat.S_ISREG(mode):
        kind = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
                stat.S_ISBLK: "a block device"}
        name = next((text for test, text in kind.items() if test(mode)), "not a regular file")
        return f"is {name}, not a regular file (never opened: reading it could block forever)"
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        return f"cannot be opened for reading ({error.strerror or error})"
    if path.stat().st_size == 0:
        return "file is empty (0 bytes)"
    if not image_suffix(path) and not _is_dicom_file(path):
        suffix = "".join(path.suffixes[-2:]) or "(no extension)"
        return f"unsupported file type {suffix!r}; supported: {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders"
    return None


def _header_problems(header: Header, settings: ValidationSettings) -> list[str]:
    """Dimensionality, spacing and size problems visible in the header alone."""
    limits = settings.limits
    size = header.size
    if len(size) < 3 or min(size[:3]) < 2:
        return [f"image is 2D (size {_format(size)}); 3D volumes are required"]
    volumes = (int(np.prod(size[3:])) if len(size) > 3 else 1) * header.components
    if volumes != settings.channels:
        return [f"image holds {volumes} volumes/channels (size {_format(size)}), expected {settings.channels} "
                f"(a 4D series cannot be used as a 3D image)"]
    problems = []
    spatial_spacing = header.spatial_spacing
    for axis, value in zip("xyz", spatial_spacing):
        if not math.isfinite(value) or value <= 0:
            problems.append(f"spacing along {axis} is {value:g} mm; spacing must be positive")
        elif not limits.min_spacing_mm <= value <= limits.max_spacing_mm:
            problems.append(f"spacing along {axis} is {value:g} mm, outside the plausible range "
                            f"[{limits.min_spacing_mm:g}, {limits.max_spacing_mm:g}] mm")
    spatial = header.spatial_size
    if max(spatial) > limits.max_axis_voxels or math.prod(spatial) > limits.max_voxels:
        problems.append(f"size {_format(spatial)} ({math.prod(spatial):.3g} voxels) is beyond the plausible maximum "
                        f"({limits.max_axis_voxels} per axis, {limits.max_voxels:.3g} in total)")
    if problems:
        return problems
    if settings.target_spacing is not None:
        resampled = [round(n * s / t) for n, s, t in zip(spatial, spatial_spacing, settings.target_spacing)]
        where = f"after resampling to {_format(settings.target_spacing)} mm"
    else:
        resampled, where = list(spatial), "at its native spacing"
    if max(resampled) > limits.max_axis_voxels or math.prod(resampled) > limits.max_voxels:
        problems.append(f"{where} it would be {_format(resampled)} voxels, beyond the plausible maximum "
                        f"({limits.max_axis_voxels} per axis)")
    elif any(n < limits.min_roi_fraction * r for n, r in zip(resampled, settings.roi_size)):
        problems.append(f"{where} it is only {_format(resampled)} voxels, less than "
                        f"{limits.min_roi_fraction:g} of the {_format(settings.roi_size)} ROI on some axis "
                        "(patches would be mostly padding)")
    return problems


def _geometry_problems(label: Header, image: Header, limits: ValidationLimits) -> list[str]:
    def close(a: Sequence[float], b: Sequence[float]) -> bool:
        return len(a) == len(b) and bool(np.allclose(a, b, rtol=limits.geometry_rtol, atol=limits.geometry_atol))

    problems = []
    if label.spatial_size != image.spatial_size:
        problems.append(f"label size {_format(label.spatial_size)} differs from its image's {_format(image.spatial_size)}")
    if not close(label.spatial_spacing, image.spatial_spacing):
        problems.append(f"label spacing {_format(label.spatial_spacing)} mm differs from its image's "
                        f"{_format(image.spatial_spacing)} mm")
    if not close(label.origin[:3], image.origin[:3]):
        problems.append(f"label origin ({_format(label.origin[:3])}) differs from its image's ({_format(image.origin[:3])})")
    if not close(label.direction[:9], image.direction[:9]):
        problems.append("label direction cosines differ from its image's")
    return problems


# --------------------------------------------------------------------------- one case
def _checked_header(path: Path, settings: ValidationSettings, report: CaseReport) -> Header | None:
    """The header of a file that passed the file checks, or None after reporting why not.

    DICOM folders have no single header; they are checked after reading.
    """
    problem = _file_type_problem(path)
    if problem is not None:
        report.add(path, problem)
        return None
    if path.is_dir():
        return None
    try:
        header = Header.of_file(path)
    except DataSourceError as error:
        report.problems.append(str(error))
        return None
    problems = _header_problems(header, settings)
    for problem in problems:
        report.add(path, problem)
    return None if problems else header


def _check_voxels(path: Path, data: torch.Tensor, settings: ValidationSettings, report: CaseReport) -> None:
    if data.is_floating_point():
        nan, inf = int(torch.isnan(data).sum()), int(torch.isinf(data).sum())
        if nan or inf:
            report.add(path, f"holds {nan} NaN and {inf} infinite voxel(s) of {data.numel()}")
        finite = data[torch.isfinite(data)]
    else:
        finite = data
    if finite.numel() == 0:
        return
    low, high = float(finite.min()), float(finite.max())
    report.intensity = [low, high]
    if low == high:
        report.add(path, f"image is constant (every voxel is {low:g})")
    elif (problem := label_map_problem(finite)) is not None:
        report.add(path, problem)
    elif settings.foreground_threshold is not None and high <= settings.foreground_threshold:
        report.add(path, f"no voxel above the foreground threshold {settings.foreground_threshold:g} (maximum {high:g}): "
                         "the preset's foreground crop would be empty")


#: An "image" with at most this many distinct non-negative integer values is taken for a label map.
LABEL_MAP_MAX_LEVELS = 16


def label_map_problem(data: torch.Tensor) -> str | None:
    """Why ``data`` (an image's voxels) looks like a label map rather than an image, or None.

    Label maps hold a few small non-negative integers (background and class indices); CT, MRI and
    PET images hold hundreds of levels or negative values. Sampled on a strided subset first so a
    real image is cleared without a full ``unique``.
    """
    flat = data.reshape(-1)
    for values in (flat[:: max(1, flat.numel() // 65536)], flat):
        if values.is_floating_point() and not bool((values == values.round()).all()):
            return None
        if float(values.min()) < 0:  # CT: cleared without sorting (``unique``)
            return None
        levels = torch.unique(values)
        if len(levels) > LABEL_MAP_MAX_LEVELS:
            return None
    shown = ", ".join(f"{float(v):g}" for v in levels)
    return (f"looks like a label map, not an image: only {len(levels)} distinct integer values ({shown}); "
            "point the image entry at the scan, or name label files *_label/*_seg/*_mask")


def _check_label_values(path: Path, data: torch.Tensor, settings: ValidationSettings, report: CaseReport) -> None:
    values = torch.unique(data.to(torch.int64)).tolist()
    report.label_values = values
    negative = [v for v in values if v < 0]
    if negative:
        report.add(path, f"label map holds negative values {negative[:10]}")
    if settings.num_classes is not None:
        outside = [v for v in values if v >= settings.num_classes]
        if outside:
            report.add(path, f"label values {outside[:10]} are outside the declared classes 0..{settings.num_classes - 1}")
    if values == [0]:
        report.add(path, "label map holds only background (0): no foreground voxel")


# Checks of the decoded voxels, run on the one decode that preprocessing then reuses. Each takes
# ``(path, data, settings, report)`` (``data``: the voxels as stored, C x I x J x K) and adds
# ``report.add(path, problem)`` for what is wrong; a new check is a function appended here.
ImageCheck = Callable[[Path, torch.Tensor, ValidationSettings, CaseReport], None]
IMAGE_CHECKS: tuple[ImageCheck, ...] = (_check_voxels,)
LABEL_CHECKS: tuple[ImageCheck, ...] = (_check_label_values,)


@dataclass
class DecodedCase:
    """The decoded volumes of a case that passed its checks, handed on to preprocessing (no second read)."""

    image: Any  # tio.ScalarImage, loaded
    label: Any | None = None  # tio.LabelMap, loaded


def inspect_case(case: Case, settings: ValidationSettings) -> tuple[CaseReport, DecodedCase | None]:
    """Check one case (see the module docstring), decoding each file at most once; never raises for a
    data problem. The decoded volumes come back when the case is good, for :mod:`data_modules.prepare`."""
    report = CaseReport(case.case_id, str(case.image), None if case.label is None else str(case.label))
    image_path = Path(case.image)
    image_header = _checked_header(image_path, settings, report)
    image = label = None
    if image_header is not None or (not report.problems and image_path.is_dir()):
        try:
            image, voxels = read_image_as_stored(image_path, channels=settings.channels)
        except DataSourceError as error:
            report.problems.append(str(error))
        else:
            if image_header is None:  # DICOM series: its geometry is known now
                image_header = Header.of_image(image.as_sitk())
                for problem in _header_problems(image_header, settings):
                    report.add(image_path, problem)
            report.shape = list(image.spatial_shape)
            report.spacing = [float(s) for s in image.spacing]
            for check in IMAGE_CHECKS:
                check(image_path, voxels, settings, report)
    if case.label is not None:
        label_path = Path(case.label)
        label_header = _checked_header(label_path, settings, report)
        if label_header is not None:
            if image_header is not None:
                for problem in _geometry_problems(label_header, image_header, settings.limits):
                    report.add(label_path, problem)
            try:
                label = read_label(label_path)
            except DataSourceError as error:
                report.problems.append(str(error))
            else:
                for check in LABEL_CHECKS:
                    check(label_path, label.data, settings, report)
    return report, DecodedCase(image, label) if report.ok and image is not None else None


def validate_case(case: Case, settings: ValidationSettings) -> CaseReport:
    """Check one case; the report only (``check-data``)."""
    return inspect_case(case, settings)[0]


def unexpected_failure(case: Case, error: BaseException, doing: str = "checked") -> CaseReport:
    """A report for a case whose check or preprocessing raised something unforeseen: a bad case, not a crash."""
    report = CaseReport(case.case_id, str(case.image), None if case.label is None else str(case.label))
    report.add(case.image, f"cannot be {doing} ({type(error).__name__}: {error})"[:500])
    return report


def _validate_safely(case: Case, settings: ValidationSettings) -> CaseReport:
    """Worker entry point: any unexpected failure becomes a problem of the case, not a crash."""
    try:
        return validate_case(case, settings)
    except Exception as error:  # noqa: BLE001 - every case must be reported, the others still checked
        return unexpected_failure(case, error)


# --------------------------------------------------------------------------- many cases, with the cache
def _entry_directory(case: Case, preprocessing: Preprocessing, channels: int, cache_root: Path) -> Path | None:
    try:
        return entry_dir(cache_root, case, cache_key(case, preprocessing, channels))
    except OSError:
        return None  # a source that cannot be stat'ed is reported by the checks themselves


def validate_cases(
    cases: Sequence[Case],
    settings: ValidationSettings,
    preprocessing: Preprocessing,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    report: Callable[[str], None] = log.info,
) -> list[CaseReport]:
    """Reports for ``cases`` (same order), reusing cached results of unchanged good cases.

    Misses are checked in a ``spawn`` process pool when ``num_workers > 1`` (``check-data --workers``).
    Good results are stored with their cache entries (see :func:`~data_modules.cache.record_validation`);
    entries created later by :func:`~data_modules.prepare.prepare_case` skip the re-check and read the files once.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fingerprint = settings.fingerprint()
    reports: list[CaseReport | None] = [None] * len(cases)
    directories = [_entry_directory(case, preprocessing, settings.channels, cache_root) for case in cases]
    missing = []
    for index, (case, directory) in enumerate(zip(cases, directories)):
        record = cached_validation(directory) if directory is not None else None
        if record and record.get("fingerprint") == fingerprint and record.get("ok"):
            reports[index] = CaseReport(case.case_id, str(case.image), None if case.label is None else str(case.label),
                                        shape=record.get("shape"), spacing=record.get("spacing"),
                                        intensity=record.get("intensity"), label_values=record.get("label_values"),
                                        from_cache=True)
        else:
            missing.append(index)
    if missing:
        report(f"checking {len(missing)} of {len(cases)} case(s) (the others passed before and are unchanged)")
        if num_workers > 1 and len(missing) > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(num_workers, len(missing)), mp_context=context) as pool:
                outcomes = list(pool.map(_validate_safely, [cases[i] for i in missing], [settings] * len(missing)))
        else:
            outcomes = [_validate_safely(cases[i], settings) for i in missing]
        for index, outcome in zip(missing, outcomes):
            reports[index] = outcome
            if outcome.ok and directories[index] is not None:
                record_validation(directories[index], outcome.record(settings))
    return [r for r in reports if r is not None]


def bad_cases_message(reports: Sequence[CaseReport], total: int) -> str:
    """ONE message naming every bad case, its file(s) and problem(s)."""
    bad = [r for r in reports if not r.ok]
    lines = [f"{len(bad)} of {total} case(s) cannot be used, they failed the data checks or preprocessing (fix them, or set the data "
             "module's on_bad_case: skip to train without them):"]
    for item in bad:
        lines.append(f"  - {item.case_id}:")
        lines.extend(f"      {problem}" for problem in item.problems)
    return "\n".join(lines)


def select_good_cases(
    cases: Sequence[Case],
    reports: Sequence[CaseReport],
    on_bad_case: OnBadCase,
) -> tuple[list[Case], list[dict[str, Any]]]:
    """(usable cases, summaries of skipped ones) under the ``on_bad_case`` policy.

    ``error`` raises :class:`DataSourceError` with :func:`bad_cases_message`; ``skip`` drops the
    bad cases but still raises when none is left.
    """
    if on_bad_case not in ON_BAD_CASE_CHOICES:
        raise ValueError(f"on_bad_case must be one of {ON_BAD_CASE_CHOICES}, got {on_bad_case!r}")
    bad = [r for r in reports if not r.ok]
    if bad and (on_bad_case == "error" or len(bad) == len(cases)):
        message = bad_cases_message(reports, len(cases))
        if on_bad_case == "skip":
            message = "every case is bad, nothing is left to train on. " + message
        raise DataSourceError(message)
    good = [case for case, r in zip(cases, reports) if r.ok]
    return good, [r.summary() for r in bad]


def format_table(reports: Sequence[CaseReport]) -> str:
    """A fixed-width table: one row per case, then one line per problem under a bad case."""
    header = ("case", "status", "size", "spacing (mm)", "intensity", "label values")
    rows = []
    for r in reports:
        rows.append((
            r.case_id,
            "ok (cached)" if r.ok and r.from_cache else "ok" if r.ok else f"BAD ({len(r.problems)})",
            "-" if r.shape is None else _format(r.shape),
            "-" if r.spacing is None else " x ".join(f"{s:.3g}" for s in r.spacing),
            "-" if r.intensity is None else f"[{r.intensity[0]:.4g}, {r.intensity[1]:.4g}]",
            "-" if r.label_values is None else ",".join(map(str, r.label_values[:12])) + (
                ",..." if len(r.label_values) > 12 else ""),
        ))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    for r, row in zip(reports, rows):
        lines.append("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
        lines.extend(f"    ! {problem}" for problem in r.problems)
    bad = sum(not r.ok for r in reports)
    lines.append(f"{len(reports) - bad} of {len(reports)} case(s) ok, {bad} bad")
    return "\n".join(lines)
