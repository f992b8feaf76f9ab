"""Writers of real image files for the data tests (SimpleITK), shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_modules.sources import process_locale_kept

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1"


def to_sitk(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A SimpleITK image from an array in voxel order (i, j, k), as TorchIO holds it."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in direction))
    return image


def write_image(path: Path, array: np.ndarray, **geometry) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(array, **geometry), str(path))
    return path


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    series_uid: str,
    spacing=(0.7, 0.7, 2.5),
    origin=(-10.0, 5.0, 100.0),
    prefix="slice",
) -> Path:
    """One CT series, one file per slice, with the tags GDCM needs to sort and group it."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = to_sitk(array.astype(np.int16), spacing=spacing, origin=origin)
    cosines = volume.GetDirection()
    orientation = "\\".join(str(c) for c in (cosines[0], cosines[3], cosines[6], cosines[1], cosines[4], cosines[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        slice_image = volume[:, :, k]
        position = "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (
            ("0008|0060", "CT"),
            ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
            ("0008|0018", f"{series_uid}.{k + 1}"),
            ("0020|000d", STUDY_UID),
            ("0020|000e", series_uid),
            ("0020|0013", str(k + 1)),
            ("0020|0032", position),
            ("0020|0037", orientation),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}_{k:03d}.dcm"))
        with process_locale_kept():
            writer.Execute(slice_image)
    return folder


def ct_volume(shape=(24, 20, 12), seed=0) -> np.ndarray:
    """Random int16 HU values with a body-like block above the air background."""
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000, dtype=np.int16)
    body = tuple(slice(n // 4, n - n // 4) for n in shape)
    volume[body] = rng.integers(-150, 300, size=volume[body].shape)
    return volume


def mapped_file(address: int) -> str | None:
    """The file a memory address of this process is mapped from (Linux ``/proc/self/maps``), if any."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else None
    return None
