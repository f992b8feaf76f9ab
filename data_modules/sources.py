"""Discovery of cases (folder, DICOM series, CSV list, MSD/MONAI ``dataset.json``) and image reading.

Every problem with the input is raised as :class:`DataSourceError` with the offending path in the
message, at discovery time, so that a bad dataset fails before training starts and never mid-epoch.
Discovery only checks that files exist; whether they decode is checked by :func:`read_image`, which
the cache calls once per case (and reports all bad cases together). Each file is decoded once,
its completeness included (a ``.nii.gz`` is checked against its gzip CRC-32 and length).
"""

from __future__ import annotations

import csv
import gzip
import json
import locale
import os
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torchio.data.io import check_uint_to_int, ensure_4d, sitk_to_nib

#: Single-file formats discovered in folders (read through TorchIO, i.e. SimpleITK then NiBabel).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
#: Extensions that mark a file as DICOM without opening it; other files are sniffed for "DICM".
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


class DataSourceError(ValueError):
    """The input data cannot be used; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class Case:
    """One subject: an image (file or DICOM series folder) and an optional label map."""

    case_id: str
    image: Path
    label: Path | None = None


def image_suffix(path: Path) -> str | None:
    """The supported image suffix of ``path`` (``.nii.gz`` counts as one), or None."""
    name = path.name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def strip_image_suffix(name: str) -> str:
    suffix = image_suffix(Path(name))
    return name[: -len(suffix)] if suffix else name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            preamble = handle.read(132)
    except OSError:
        return False
    return len(preamble) == 132 and preamble[128:] == b"DICM"


def _check_unique_ids(cases: Sequence[Case], origin: str) -> list[Case]:
    paths_by_id: dict[str, list[Path]] = {}
    for case in cases:
        paths_by_id.setdefault(case.case_id, []).append(case.image)
    duplicates = {key: paths for key, paths in paths_by_id.items() if len(paths) > 1}
    if duplicates:
        lines = [f"  {key}: {', '.join(map(str, paths))}" for key, paths in sorted(duplicates.items())]
        raise DataSourceError(
            f"{origin}: several images map to the same case id (ids must be unique):\n" + "\n".join(lines)
        )
    return list(cases)


#: Words that mark a file (``case_label.nii.gz``, ``label.nii.gz``) or a folder (``labelsTr/``,
#: ``segmentations/``) as holding label maps rather than images.
LABEL_WORDS = ("labels", "label", "segmentations", "segmentation", "segs", "seg", "masks", "mask", "gt",
               "groundtruth", "ground_truth")
#: Words that mark the image of a pair (``case_image.nii.gz``, ``imagesTr/``); stripped when pairing.
IMAGE_WORDS = ("images", "image", "imgs", "img", "volumes", "volume", "vol", "scans", "scan")
_WORDS = {kind: "|".join(sorted(words, key=len, reverse=True)) for kind, words in
          (("label", LABEL_WORDS), ("image", IMAGE_WORDS))}
#: ``case_label`` / ``case-seg`` / ``label``: (base, word); nnU-Net's channel suffix ``case_0000`` marks an image.
_FILE_MARK = {kind: re.compile(rf"^(?:(.*?)[_\-.])?({words})$", re.IGNORECASE) for kind, words in _WORDS.items()}
_NNUNET_CHANNEL = re.compile(r"^(.*)_\d{4}$")
#: ``labelsTr`` / ``images`` / ``masks_test``: the folder's role word and what follows it (MSD's Tr/Ts).
_FOLDER_MARK = {kind: re.compile(rf"^({words})[_\-]?(tr|ts|train|test|val)?$", re.IGNORECASE)
                for kind, words in _WORDS.items()}


def label_marker(relative: Path) -> str | None:
    """Why a file at ``relative`` (inside a scanned folder) is a label map by its name, or None.

    A folder on the path named like ``labels``/``labelsTr``/``segmentations``/``masks``, or a file
    name ending in ``_label``, ``_seg``, ``_mask``, ``_gt``, ... (or being just ``label``, ``seg``...).
    """
    for part in relative.parts[:-1]:
        if _FOLDER_MARK["label"].match(part):
            return f"in a label folder ({part}/)"
    match = _FILE_MARK["label"].match(strip_image_suffix(relative.name))
    return f"name ends in '{match[2]}'" if match else None


def _pairing_key(relative: Path, kind: str) -> tuple[str, str]:
    """(folder, base name) under which an image and its label map meet.

    Role folders count by what follows the role word (``imagesTr`` and ``labelsTr`` both give
    ``tr``), and role words at the end of a file name are dropped (``case_image``, ``case_label``
    and ``case`` all give ``case``; nnU-Net's ``case_0000`` gives ``case``).
    """
    folders = []
    for part in relative.parts[:-1]:
        role = _FOLDER_MARK["label"].match(part) or _FOLDER_MARK["image"].match(part)
        folders.append(f"<{(role[2] or '').lower()}>" if role else part)
    base = strip_image_suffix(relative.name)
    match = _FILE_MARK[kind].match(base)
    if match:
        base = match[1] or ""
    elif kind == "image" and _NNUNET_CHANNEL.match(base):
        base = _NNUNET_CHANNEL.match(base)[1]
    return "/".join(folders), base


def _pair_labels(images: list[tuple[Path, Case]], labels: list[Path], root: Path) -> tuple[list[Case], list[str]]:
    """Cases with their label maps attached where exactly one image and one label share a key; notes on the rest."""
    image_keys: dict[tuple[str, str], list[int]] = {}
    for index, (relative, _) in enumerate(images):
        image_keys.setdefault(_pairing_key(relative, "image"), []).append(index)
    label_keys: dict[tuple[str, str], list[Path]] = {}
    for label in labels:
        label_keys.setdefault(_pairing_key(label.relative_to(root), "label"), []).append(label)
    cases = [case for _, case in images]
    notes = []
    for key, group in sorted(label_keys.items()):
        owners = image_keys.get(key, [])
        if len(group) == 1 and len(owners) == 1:
            case = cases[owners[0]]
            cases[owners[0]] = Case(case.case_id, case.image, group[0])
        elif not owners:
            notes.extend(f"{label}: label map with no image of the same name" for label in group)
        else:
            candidates = ", ".join(str(images[i][1].image) for i in owners)
            notes.extend(f"{label}: ambiguous pairing with {len(owners)} image(s) ({candidates})" for label in group)
    return cases, notes


def cases_from_folder(folder: str | os.PathLike, with_labels: bool = False) -> list[Case]:
    """Every NIfTI/NRRD/MHA/MHD file and every DICOM series folder below ``folder``, recursively.

    Case ids are the paths relative to ``folder`` without extension (a series folder's id is its
    relative path, or the folder's own name when ``folder`` itself is the series). Hidden files and
    folders are skipped; other unknown files are ignored, but if nothing usable is found the error
    lists what was there. A folder holding files of more than one DICOM series is an error: the
    series would otherwise be silently mixed or dropped.

    Label maps are never images: files whose name or folder marks them as labels (see
    :func:`label_marker`: MSD's ``labelsTr/``, ``*_label``, ``*_seg``, ``*_mask``, ...) are set
    aside. With ``with_labels`` each is attached to its image where the pairing is unambiguous
    (same folder or the sibling role folder, same base name); a label map that pairs with no image
    or with several is reported in a warning and not used.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataSourceError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataSourceError(f"{root}: is not a folder (pass files through a CSV or dataset.json)")
    images: list[tuple[Path, Case]] = []
    labels: list[Path] = []
    ignored: Counter[str] = Counter()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(directory)
        has_dicom = False
        for name in sorted(f for f in files if not f.startswith(".")):
            path = here / name
            if image_suffix(path):
                relative = path.relative_to(root)
                if label_marker(relative):
                    labels.append(path)
                else:
                    images.append((relative, Case(case_id=strip_image_suffix(relative.as_posix()), image=path)))
            elif _is_dicom_file(path):
                has_dicom = True
            else:
                ignored[path.suffix.lower() or "(no extension)"] += 1
        if has_dicom:
            dicom_series_ids(here)  # raises on a folder with mixed series
            relative = here.relative_to(root).as_posix()
            # Keyed like a file named after the series folder, so "ct_label.nii.gz" beside "ct/" pairs with it.
            images.append((Path(relative + ".nii") if relative != "." else Path(root.name + ".nii"),
                           Case(case_id=root.name if relative == "." else relative, image=here)))
    if not images:
        if labels:
            raise DataSourceError(
                f"{root}: only label maps found ({len(labels)}, e.g. {labels[0]}: {label_marker(labels[0].relative_to(root))}); "
                "point the source at the images (files named *_label/*_seg/*_mask or in labels*/ folders are never images)"
            )
        if not ignored:
            raise DataSourceError(f"{root}: folder is empty (no files found, hidden files ignored)")
        found = ", ".join(f"{suffix} ({count})" for suffix, count in ignored.most_common())
        raise DataSourceError(
            f"{root}: no usable images found. Found {sum(ignored.values())} file(s): {found}. "
            f"Supported: {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders."
        )
    if with_labels:
        cases, notes = _pair_labels(images, labels, root)
        if notes:
            warnings.warn(f"{root}: {len(notes)} label map(s) not used:\n  " + "\n  ".join(notes[:20]), stacklevel=2)
    else:
        cases = [case for _, case in images]
    return _check_unique_ids(cases, str(root))


def _resolve(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _case_id_for(image: Path) -> str:
    return strip_image_suffix(image.name)


def cases_from_csv(csv_path: str | os.PathLike, with_labels: bool = True) -> list[Case]:
    """Cases listed in a CSV with column ``image`` and optional ``label`` and ``case_id``.

    Relative paths are resolved against the CSV's folder. With ``with_labels=False`` the label
    column is ignored entirely (pre-training does not need labels, so a missing label file must not
    block it). Every missing or empty entry is reported in one error, by line number.
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataSourceError(f"{path}: CSV file does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "image" not in columns:
            raise DataSourceError(f"{path}: needs a header with an 'image' column; found columns {columns}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise DataSourceError(f"{path}: CSV lists no cases")
    base = path.parent
    cases: list[Case] = []
    problems: list[str] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get("image"):
            problems.append(f"line {line}: empty 'image' entry")
            continue
        image = _resolve(row["image"], base)
        if not image.exists():
            problems.append(f"line {line}: image {image} does not exist")
        label = _resolve(row["label"], base) if with_labels and row.get("label") else None
        if label is not None and not label.exists():
            problems.append(f"line {line}: label {label} does not exist")
        cases.append(Case(case_id=row.get("case_id") or _case_id_for(image), image=image, label=label))
    if problems:
        raise DataSourceError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return _check_unique_ids(cases, str(path))


def _datalist_entry(entry: object, index: int, key: str, json_path: Path) -> tuple[str, str | None, str | None]:
    """(image, label, case_id) of one datalist entry: a path string, or {"image": ..., "label": ...}."""
    if isinstance(entry, str) and entry:
        return entry, None, None
    if isinstance(entry, dict) and isinstance(entry.get("image"), str) and entry["image"]:
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise DataSourceError(
                f"{json_path}: entry {index} of '{key}' has a 'label' that is not a path string: {label!r:.120}"
            )
        case_id = entry.get("case_id", entry.get("id"))
        return entry["image"], label, None if case_id is None else str(case_id)
    raise DataSourceError(
        f"{json_path}: entry {index} of '{key}' is malformed: expected a path string or an object with an "
        f"'image' path string, got {entry!r:.120}"
    )


def cases_from_datalist(
    datalist: str | os.PathLike,
    key: str = "training",
    with_labels: bool = True,
    base_dir: str | os.PathLike | None = None,
) -> list[Case]:
    """Cases of one section (``training``, ``validation``, ``test``, ...) of an MSD/MONAI datalist.

    Entries are ``{"image": ..., "label": ...}`` objects or plain path strings (MSD's test list).
    Relative paths resolve against ``base_dir`` (default: the JSON's folder, as MONAI's
    ``load_decathlon_datalist`` does). An optional ``case_id``/``id`` key overrides the id derived
    from the image file name.
    """
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise DataSourceError(f"{path}: datalist file does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataSourceError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise DataSourceError(f"{path}: expected a JSON object with a '{key}' list, got {type(content).__name__}")
    if key not in content:
        sections = [name for name, value in content.items() if isinstance(value, list)]
        raise DataSourceError(f"{path}: has no '{key}' section; list sections present: {sections}")
    entries = content[key]
    if not isinstance(entries, list) or not entries:
        raise DataSourceError(f"{path}: section '{key}' must be a non-empty list")
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    cases: list[Case] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        image_value, label_value, case_id = _datalist_entry(entry, index, key, path)
        image = _resolve(image_value, base)
        if not image.exists():
            problems.append(f"entry {index}: image {image} does not exist")
        label = _resolve(label_value, base) if with_labels and label_value else None
        if label is not None and not label.exists():
            problems.append(f"entry {index}: label {label} does not exist")
        cases.append(Case(case_id=case_id or _case_id_for(image), image=image, label=label))
    if problems:
        raise DataSourceError(f"{path} ['{key}']: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return _check_unique_ids(cases, f"{path} ['{key}']")


@contextmanager
def process_locale_kept():
    """GDCM switches the whole process to the C locale when it reads DICOM, which turns Python's
    default text encoding into ASCII for every later ``open()``; put the locale back afterwards."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def dicom_series_ids(folder: Path) -> list[str]:
    """The GDCM series UIDs in ``folder`` (not recursive); exactly one is required."""
    with process_locale_kept():
        series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        raise DataSourceError(f"{folder}: no readable DICOM series in this folder")
    if len(series) > 1:
        raise DataSourceError(
            f"{folder}: holds {len(series)} DICOM series mixed in one folder ({', '.join(series)}); "
            "put each series in its own folder"
        )
    return series


def _read_dicom_series(folder: Path) -> tio.ScalarImage:
    (series_id,) = dicom_series_ids(folder)
    reader = sitk.ImageSeriesReader()
    try:
        with process_locale_kept():
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
            image = reader.Execute()
    except RuntimeError as error:
        raise DataSourceError(f"{folder}: DICOM series {series_id} cannot be read ({_first_line(error)})") from error
    array, affine = sitk_to_nib(image)
    return tio.ScalarImage(tensor=array, affine=affine, path=folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # ITK messages start with a file/line location; the reason is on a later line.
    reason = next((line for line in lines if "description" in line.lower()), lines[-1] if lines else "")
    return f"{type(error).__name__}: {reason.strip()}"[:300]


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI file's voxels start and how they are stored, from its header alone."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    slope: float
    inter: float

    @property
    def data_end(self) -> int:
        return self.offset + int(np.prod(self.shape)) * self.dtype.itemsize


def _nifti_layout(path: Path) -> _NiftiLayout:
    try:
        # The proxy, not ``header``: NiBabel resets the loaded header's vox_offset and scaling.
        proxy = nib.load(str(path)).dataobj
        return _NiftiLayout(int(proxy.offset), np.dtype(proxy.dtype), tuple(int(n) for n in proxy.shape),
                            float(proxy.slope), float(proxy.inter))
    except Exception as error:  # noqa: BLE001 - any header failure means "not a readable NIfTI"
        raise DataSourceError(f"{path}: not a readable NIfTI file ({_first_line(error)})") from error


def _check_nifti_complete(path: Path, layout: _NiftiLayout) -> None:
    """Fail on a NIfTI file whose data is cut short or whose gzip stream is damaged.

    ITK's NIfTI reader accepts both silently (the missing voxels come back as zeros or garbage),
    so compare the data size the header promises with what the file holds; for ``.nii.gz`` this
    inflates the whole stream, which also checks gzip's CRC - :func:`_read_nifti_gz` does so only
    when the one decode it already did cannot be matched to the stream's CRC.
    """
    if path.name.lower().endswith(".gz"):
        available = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 24):
                    available += len(chunk)
        except (OSError, EOFError, zlib.error) as error:
            raise DataSourceError(f"{path}: compressed data is truncated or corrupt ({_first_line(error)})") from error
    else:
        available = path.stat().st_size
    if available < layout.data_end:
        raise DataSourceError(f"{path}: file is truncated: {available} bytes of data, the header needs {layout.data_end}")


def _matches_gzip_trailer(path: Path, layout: _NiftiLayout, decoded: np.ndarray) -> bool:
    """Whether the header bytes and ITK's decoded voxels (in file order) re-encode to the CRC-32 and
    length that the gzip trailer records for the whole stream.

    A match proves the stream complete and intact and the voxels unaltered, without inflating it a
    second time (a CRC costs a small fraction of an inflate). No match is not an error by itself:
    ITK also alters the voxels of valid files (NaN and Inf become 0; a scaling that does not invert
    exactly), and a multi-member stream or trailing bytes change the trailer; the caller then
    inflates the stream to tell those from a damaged one.
    """
    if decoded.size != int(np.prod(layout.shape)) or not decoded.flags.c_contiguous:
        return False
    scaled = (layout.slope, layout.inter) != (1.0, 0.0)
    if scaled and not np.issubdtype(layout.dtype, np.integer):
        return False
    with gzip.open(path, "rb") as stream:
        header = stream.read(layout.offset)  # a few hundred bytes
    crc, length = zlib.crc32(header), len(header)
    flat = decoded.reshape(-1)
    step = 1 << 22  # bounded memory for the byte conversions
    for start in range(0, flat.size, step):
        chunk = flat[start:start + step]
        if scaled:  # ITK returns raw * slope + inter: invert it to the stored integers
            chunk = np.rint((chunk.astype(np.float64) - layout.inter) / layout.slope)
        chunk = np.ascontiguousarray(chunk, dtype=layout.dtype)  # no copy when ITK kept the stored type
        crc, length = zlib.crc32(chunk, crc), length + chunk.nbytes
    with open(path, "rb") as handle:
        handle.seek(-8, os.SEEK_END)
        stored_crc, stored_length = struct.unpack("<II", handle.read(8))
    return crc == stored_crc and length % (1 << 32) == stored_length


_READ_ERRORS = (RuntimeError, ValueError, OSError, EOFError, zlib.error)


def _unreadable(path: Path, error: BaseException) -> DataSourceError:
    return DataSourceError(f"{path}: cannot be read as an image, the file may be truncated or corrupt ({_first_line(error)})")


def _read_through_torchio(path: Path, image_class: type[tio.Image]) -> tio.Image:
    image = image_class(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchIO warns before falling back from SimpleITK to NiBabel
            image.load()
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error
    return image


def _read_nifti_gz(path: Path, image_class: type[tio.Image], layout: _NiftiLayout) -> tuple[tio.Image, bool]:
    """Read a ``.nii.gz`` on one inflate, as TorchIO would (SimpleITK, NiBabel as the fallback), and
    say whether its voxels were proven to be the file's exact bytes (see :func:`_matches_gzip_trailer`).

    Checking the stream first, then letting ITK read it, had inflated every file twice.
    """
    try:
        decoded = sitk.ReadImage(str(path))
    except RuntimeError:
        _check_nifti_complete(path, layout)  # a damaged stream is the likelier cause: name it
        return _read_through_torchio(path, image_class), False
    as_stored = _matches_gzip_trailer(path, layout, sitk.GetArrayViewFromImage(decoded))
    if not as_stored:
        _check_nifti_complete(path, layout)
    try:
        data, affine = sitk_to_nib(decoded, keepdim=True)  # TorchIO's own conversion, so the same tensor
        tensor = ensure_4d(torch.as_tensor(check_uint_to_int(data))).contiguous()
        return image_class(tensor=tensor, affine=affine, path=path), as_stored
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error


@dataclass
class _ReadFile:
    image: tio.Image
    layout: _NiftiLayout | None = None  # NIfTI files only
    as_stored: bool = False  # the voxels are proven to be the file's exact bytes


def _read_file(path: Path, image_class: type[tio.Image]) -> _ReadFile:
    if path.stat().st_size == 0:
        raise DataSourceError(f"{path}: file is empty (0 bytes)")
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        layout = _nifti_layout(path)
        image, as_stored = _read_nifti_gz(path, image_class, layout)
        return _ReadFile(image, layout, as_stored)
    if name.endswith(".nii"):
        layout = _nifti_layout(path)
        _check_nifti_complete(path, layout)  # a size comparison: nothing is decoded twice
        return _ReadFile(_read_through_torchio(path, image_class), layout)
    return _ReadFile(_read_through_torchio(path, image_class))


def _check_volume(path: Path, image: tio.Image, channels: int) -> None:
    num_channels, *spatial = image.shape
    if min(spatial) < 2:
        raise DataSourceError(f"{path}: image is 2D (size {' x '.join(map(str, spatial))}); 3D volumes are required")
    if num_channels != channels:
        hint = f" (declare channels={num_channels} if these are channels)" if channels == 1 else ""
        raise DataSourceError(f"{path}: image has {num_channels} channels/volumes (4D), expected {channels}{hint}")


def _read_image(path: str | os.PathLike, channels: int) -> tuple[Path, _ReadFile]:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataSourceError(f"{path}: no such file or folder")
    read = _ReadFile(_read_dicom_series(path)) if path.is_dir() else _read_file(path, tio.ScalarImage)
    _check_volume(path, read.image, channels)
    return path, read


def read_image(path: str | os.PathLike, channels: int = 1) -> tio.ScalarImage:
    """Read a volume file or a DICOM series folder as a loaded ``tio.ScalarImage`` (C x I x J x K).

    Files go through TorchIO (SimpleITK, NiBabel fallback); folders through SimpleITK's
    ``ImageSeriesReader`` with GDCM series ids. The result must be 3D with exactly ``channels``
    channels: a 4D file is only accepted as a multi-channel image when ``channels > 1`` is declared,
    so that a time series is never silently treated as channels. A ``.nii.gz`` is inflated once.
    """
    return _read_image(path, channels)[1].image


def read_image_as_stored(path: str | os.PathLike, channels: int = 1) -> tuple[tio.ScalarImage, torch.Tensor]:
    """:func:`read_image` and the voxels exactly as the file stores them, for the data checks.

    ITK's NIfTI reader (which TorchIO uses) turns NaN and Inf into 0, so a floating-point NIfTI
    file's voxels come again from NiBabel, which keeps them - unless its one decode already matched
    the gzip stream's CRC-32, which proves ITK changed nothing.
    """
    path, read = _read_image(path, channels)
    layout = read.layout
    if layout is None or read.as_stored or not np.issubdtype(layout.dtype, np.floating):
        return read.image, read.image.data
    return read.image, torch.from_numpy(np.asanyarray(nib.load(str(path)).dataobj))


def read_label(path: str | os.PathLike) -> tio.LabelMap:
    """Read a single-channel 3D label map file whose voxel values are integers (a ``.nii.gz`` inflated once)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataSourceError(f"{path}: label map file does not exist")
    label = _read_file(path, tio.LabelMap).image
    _check_volume(path, label, channels=1)
    data = label.data
    if data.is_floating_point() and not bool((data == data.round()).all()):
        raise DataSourceError(f"{path}: label map holds non-integer values; expected class indices")
    return label


def combine_cases(groups: Iterable[list[Case]]) -> list[Case]:
    """Concatenate case lists from several sources; ids must stay unique across them."""
    return _check_unique_ids([case for group in groups for case in group], "combined sources")


def split_by_subject(items: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) split of items with a ``case_id``, reproducible from ``seed``.

    The order is drawn from the sorted case ids, so it does not depend on discovery order, and a
    subject is never on both sides. ``val_fraction > 0`` holds out at least one case and leaves at
    least one for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(items, key=lambda item: item.case_id)
    if val_fraction == 0.0:
        return ordered, []
    if len(ordered) < 2:
        raise DataSourceError(
            f"a validation split needs at least 2 cases, found {len(ordered)}; set val_fraction=0 to train on all"
        )
    num_val = min(max(1, round(val_fraction * len(ordered))), len(ordered) - 1)
    permutation = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(permutation[:num_val])
    train = [item for i, item in enumerate(ordered) if i not in held_out]
    val = [item for i, item in enumerate(ordered) if i in held_out]
    return train, val
