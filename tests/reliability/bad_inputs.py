"""The corpus of bad inputs: each entry writes real files into a temporary folder.

Every entry builds a small dataset - two good cases plus the bad input - and says which file the
error must name and which problem it must state. ``level`` is where the problem is caught:

* ``case`` - by the data checks (:mod:`data_modules.validation`); ``on_bad_case: skip`` drops it;
* ``source`` - by discovery (:mod:`data_modules.sources`): the dataset description itself is
  wrong (missing/empty folder, malformed dataset.json, listed file missing, mixed DICOM series in
  a folder source); an error with either policy.

Unreadable files: the tests run as root, for whom ``chmod 000`` does not prevent reading. Real
unreadability is produced instead by a folder where a file is expected, a dangling symlink and a
FIFO (reading it would block forever: it must never be opened). The ``chmod 000`` entry is kept
and skipped when running as root.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHAPE = (40, 40, 24)
SPACING = (1.5, 1.5, 2.0)
CLASSES = {"0": "background", "1": "liver", "2": "spleen"}


def _volume_files():
    """tests/data/volume_files.py (SimpleITK writers, incl. DICOM series), loaded by path."""
    spec = importlib.util.spec_from_file_location("volume_files", REPO / "tests" / "data" / "volume_files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ct(seed: int = 0, shape=SHAPE, dtype=np.int16) -> np.ndarray:
    """Air around a box of soft tissue (above the preset's -175 HU foreground threshold)."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000, dtype=dtype)
    body = tuple(slice(n // 5, n - n // 5) for n in shape)
    volume[body] = rng.integers(-100, 200, size=volume[body].shape)
    return volume


def organs(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[10:20, 10:20, 6:12] = 1
    label[22:30, 20:30, 8:16] = 2
    return label


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_metaimage(path: Path, size=(40, 40, 24), spacing="1.5 1.5 2", data: bytes | None = None) -> Path:
    """A MetaImage with a hand-written header: any size or spacing, whatever the data holds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, size))}\nElementSpacing = {spacing}\n"
              f"ElementType = MET_SHORT\n")
    if path.suffix == ".mhd":
        raw = path.with_suffix(".raw")
        raw.write_bytes(data if data is not None else b"\0" * 64)
        path.write_text(header + f"ElementDataFile = {raw.name}\n")
    else:
        body = data if data is not None else ct().transpose(2, 1, 0).tobytes()
        path.write_bytes((header + "ElementDataFile = LOCAL\n").encode() + body)
    return path


@dataclass
class Dataset:
    """A built dataset: data-module arguments and the file the error must name."""

    args: list[str]
    bad_file: Path
    datalist: Path | None = None  # when the bad case is the last "training" entry of this dataset.json


def _good_cases(root: Path, labels: bool) -> list[dict]:
    entries = []
    for index in range(2):
        entry = {"image": str(write_nifti(root / "images" / f"good_{index}.nii.gz", ct(index)))}
        if labels:
            entry["label"] = str(write_nifti(root / "labels" / f"good_{index}.nii.gz", organs()))
        entries.append(entry)
    return entries


def datalist(root: Path, bad: dict | str, labels: bool = False) -> Path:
    """dataset.json: two good cases and ``bad``; with labels, a validation section and class names."""
    content = {"labels": CLASSES, "training": [*_good_cases(root, labels), bad]}
    if labels:
        content["validation"] = [{"image": str(write_nifti(root / "images" / "val_0.nii.gz", ct(9))),
                                  "label": str(write_nifti(root / "labels" / "val_0.nii.gz", organs()))}]
    path = root / "dataset.json"
    path.write_text(json.dumps(content, indent=1))
    return path


def image_listed(write: Callable[[Path], Path], name: str = "bad.nii.gz") -> Callable[[Path], Dataset]:
    """A bad image listed in a dataset.json beside two good ones."""

    def build(root: Path) -> Dataset:
        bad = write(root / "images" / name)
        path = datalist(root, {"image": str(bad)})
        return Dataset(["--data.init_args.datalist", str(path)], bad, datalist=path)

    return build


def image_in_folder(write: Callable[[Path], Path], name: str = "bad.nii.gz") -> Callable[[Path], Dataset]:
    """A bad entry in a folder source beside two good files (for what a dataset.json cannot list)."""

    def build(root: Path) -> Dataset:
        _good_cases(root, labels=False)
        bad = write(root / "images" / name)
        return Dataset(["--data.init_args.folder", str(root / "images")], bad)

    return build


def label_listed(write_label: Callable[[Path], Path]) -> Callable[[Path], Dataset]:
    """A good image with a bad label map, in a labelled dataset.json (segmentation)."""

    def build(root: Path) -> Dataset:
        image = write_nifti(root / "images" / "bad.nii.gz", ct(7))
        label = write_label(root / "labels" / "bad.nii.gz")
        path = datalist(root, {"image": str(image), "label": str(label)}, labels=True)
        return Dataset(["--data.init_args.datalist", str(path)], label, datalist=path)

    return build


# ----------------------------------------------------------------------------------- the entries
def _zero_bytes(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _truncated(path: Path) -> Path:
    data = write_nifti(path, ct(3)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _with(value: float) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        array = ct(4).astype(np.float32)
        array[20, 20, 12] = value
        return write_nifti(path, array)

    return write


def _unknown_type(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 512)
    return path


def _folder_named_like_a_file(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("not an image")
    return path


def _dangling_symlink(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.parent / "moved_away.nii.gz")
    return path


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _no_permission(path: Path) -> Path:
    write_nifti(path, ct(5))
    path.chmod(0)
    return path


def _dicom_two_series(path: Path) -> Path:
    files = _volume_files()
    small = ct(6, shape=(24, 24, 10))
    files.write_dicom_series(path, small, series_uid="1.2.826.0.1.3680043.2.1125.7.1", prefix="a")
    files.write_dicom_series(path, small, series_uid="1.2.826.0.1.3680043.2.1125.7.2", prefix="b")
    return path


def _source_empty_folder(root: Path) -> Dataset:
    (root / "empty").mkdir(parents=True)
    return Dataset(["--data.init_args.folder", str(root / "empty")], root / "empty")


def _source_only_unknown_files(root: Path) -> Dataset:
    (root / "exports").mkdir(parents=True)
    (root / "exports" / "scan.xyz").write_bytes(b"\0" * 100)
    (root / "exports" / "readme.txt").write_text("exported volumes")
    return Dataset(["--data.init_args.folder", str(root / "exports")], root / "exports")


def _source_folder_with_mixed_dicom(root: Path) -> Dataset:
    _good_cases(root, labels=False)
    folder = _dicom_two_series(root / "images" / "series")
    return Dataset(["--data.init_args.folder", str(root / "images")], folder)


def _source_missing_in_datalist(root: Path) -> Dataset:
    missing = root / "images" / "gone.nii.gz"
    return Dataset(["--data.init_args.datalist", str(datalist(root, {"image": str(missing)}))], missing)


def _source_missing_in_csv(root: Path) -> Dataset:
    good = _good_cases(root, labels=False)
    missing = root / "images" / "gone.nii.gz"
    csv = root / "cases.csv"
    csv.write_text("image\n" + "\n".join([*(g["image"] for g in good), str(missing)]) + "\n")
    return Dataset(["--data.init_args.csv", str(csv)], missing)


def _source_malformed_entry(root: Path) -> Dataset:
    path = datalist(root, {"img": "images/typo.nii.gz"})
    return Dataset(["--data.init_args.datalist", str(path)], path)


def _label(array: np.ndarray, **geometry) -> Callable[[Path], Path]:
    return lambda path: write_nifti(path, array, **geometry)


@dataclass(frozen=True)
class BadInput:
    name: str
    build: Callable[[Path], Dataset]
    problem: str  # a regular expression the message must hold right after the file's path
    level: str = "case"  # or "source"
    labels: bool = False  # needs the segmentation data module
    skip_as_root: bool = False


CORPUS = [
    BadInput("zero_byte_nifti", image_listed(_zero_bytes), r"file is empty \(0 bytes\)"),
    BadInput("truncated_nifti_gz", image_listed(_truncated), r"compressed data is truncated or corrupt"),
    BadInput("image_2d", image_listed(lambda p: write_nifti(p, ct(1)[:, :, 0])), r"image is 2D"),
    BadInput("image_4d", image_listed(lambda p: write_nifti(p, np.stack([ct(1)] * 3, axis=-1))),
             r"image holds 3 volumes/channels .*expected 1"),
    BadInput("nan_voxels", image_listed(_with(float("nan"))), r"holds 1 NaN and 0 infinite voxel"),
    BadInput("inf_voxels", image_listed(_with(float("inf"))), r"holds 0 NaN and 1 infinite voxel"),
    BadInput("constant_volume", image_listed(lambda p: write_nifti(p, np.full(SHAPE, 40, np.int16))),
             r"image is constant \(every voxel is 40\)"),
    BadInput("unknown_extension", image_listed(_unknown_type, "scan.xyz"),
             r"unsupported file type '\.xyz'"),
    BadInput("folder_where_a_file_is_expected", image_listed(_folder_named_like_a_file),
             r"is a folder, but its name says it is an image file"),
    BadInput("dangling_symlink", image_in_folder(_dangling_symlink), r"is a dangling symbolic link"),
    BadInput("fifo_instead_of_a_file", image_in_folder(_fifo), r"is a FIFO \(named pipe\), not a regular file"),
    BadInput("no_read_permission", image_listed(_no_permission), r"cannot be opened for reading \(Permission denied\)",
             skip_as_root=True),
    BadInput("header_claims_100000_cubed", image_listed(lambda p: write_metaimage(p, size=(100000,) * 3), "huge.mhd"),
             r"size 100000 x 100000 x 100000 \(1e\+15 voxels\) is beyond the plausible maximum"),
    BadInput("spacing_zero", image_listed(lambda p: write_metaimage(p, spacing="0 1.5 2"), "flat.mha"),
             r"spacing along x is 0 mm; spacing must be positive"),
    BadInput("spacing_negative", image_listed(lambda p: write_metaimage(p, spacing="1.5 -1.5 2"), "mirror.mha"),
             r"spacing along y is -1\.5 mm; spacing must be positive"),
    BadInput("spacing_1e6", image_listed(lambda p: write_metaimage(p, spacing="1.5 1.5 1000000"), "stretched.mha"),
             r"spacing along z is 1e\+06 mm, outside the plausible range"),
    BadInput("too_small_for_the_roi", image_listed(lambda p: write_nifti(p, ct(2, shape=(6, 6, 5)))),
             r"after resampling to 1\.5 x 1\.5 x 2 mm it is only 6 x 6 x 5 voxels, less than 0\.25 of the 32 x 32 x 32 ROI"),
    BadInput("dicom_two_series_listed", image_listed(_dicom_two_series, "series"),
             r"holds 2 DICOM series mixed in one folder"),
    BadInput("label_size_differs", label_listed(_label(organs((40, 40, 20)))),
             r"label size 40 x 40 x 20 differs from its image's 40 x 40 x 24", labels=True),
    BadInput("label_spacing_differs", label_listed(_label(organs(), spacing=(1.5, 1.5, 3.0))),
             r"label spacing 1\.5 x 1\.5 x 3 mm differs from its image's 1\.5 x 1\.5 x 2 mm", labels=True),
    BadInput("label_origin_differs", label_listed(_label(organs(), origin=(0.0, 0.0, 10.0))),
             r"label origin \(.*10\) differs from its image's", labels=True),
    BadInput("label_values_outside_classes", label_listed(_label(np.where(organs() == 2, 7, organs()).astype(np.uint8))),
             r"label values \[7\] are outside the declared classes 0\.\.2", labels=True),
    BadInput("label_only_background", label_listed(_label(np.zeros(SHAPE, np.uint8))),
             r"label map holds only background", labels=True),
    BadInput("source_empty_folder", _source_empty_folder, r"folder is empty", level="source"),
    BadInput("source_only_unknown_extensions", _source_only_unknown_files,
             r"no usable images found\. Found 2 file\(s\): .*\.xyz", level="source"),
    BadInput("source_folder_mixing_dicom_series", _source_folder_with_mixed_dicom,
             r"holds 2 DICOM series mixed in one folder", level="source"),
    BadInput("source_missing_file_in_dataset_json", _source_missing_in_datalist, r"does not exist", level="source"),
    BadInput("source_missing_file_in_csv", _source_missing_in_csv, r"does not exist", level="source"),
    BadInput("source_malformed_dataset_json_entry", _source_malformed_entry,
             r"entry 2 of 'training' is malformed", level="source"),
]


def combined(entries: list[BadInput], root: Path) -> tuple[Path, dict[str, Dataset]]:
    """One dataset.json holding the good cases and every bad case of ``entries`` that a dataset.json
    can list (case id = entry name); returns it and those entries' datasets."""
    built = {entry.name: entry.build(root / entry.name) for entry in entries}
    built = {name: dataset for name, dataset in built.items() if dataset.datalist is not None}
    first = json.loads(next(iter(built.values())).datalist.read_text())
    content = {**first, "training": first["training"][:-1]}
    for name, dataset in built.items():
        content["training"].append({**json.loads(dataset.datalist.read_text())["training"][-1], "case_id": name})
    path = root / "dataset.json"
    path.write_text(json.dumps(content, indent=1))
    return path, built
