"""Preprocessed-volume cache: hits, invalidation, memory maps, sidecar contents, one error for all bad cases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from volume_files import ct_volume, mapped_file, write_dicom_series, write_image

from data_modules import (
    Case,
    DataSourceError,
    Preprocessing,
    default_cache_dir,
    ensure_cached,
    preset,
    read_cached_array,
    volume_subject,
)
from data_modules.cache import attach_memory_maps

PLAIN = Preprocessing(orientation="RAS", spacing=None)


def _touch_later(path):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def _stamps(volume):
    folder = volume.image.parent
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_second_run_reuses_the_cache_and_touching_the_source_recomputes(tmp_path):
    source = write_image(tmp_path / "ct.nii.gz", ct_volume())
    cases = [Case("ct", source)]

    (first,) = ensure_cached(cases, PLAIN, tmp_path / "cache")
    stamps = _stamps(first)
    (again,) = ensure_cached(cases, PLAIN, tmp_path / "cache")

    assert again == first and _stamps(again) == stamps  # nothing rewritten
    assert sorted(stamps) == ["image.npy", "meta.json"]  # no temporaries left behind

    _touch_later(source)
    (touched,) = ensure_cached(cases, PLAIN, tmp_path / "cache")
    assert touched.image.parent != first.image.parent
    np.testing.assert_array_equal(np.load(touched.image), np.load(first.image))


def test_any_setting_change_gives_a_new_entry(tmp_path):
    cases = [Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()))]
    (base,) = ensure_cached(cases, PLAIN, tmp_path / "cache")
    (windowed,) = ensure_cached(cases, Preprocessing(orientation="RAS", window=(-1000, 1000)), tmp_path / "cache")

    assert windowed.image.parent != base.image.parent
    assert not np.array_equal(np.load(windowed.image), np.load(base.image))
    assert json.loads((windowed.image.parent / "meta.json").read_text())["preprocessing"]["window"] == [-1000.0, 1000.0]


def test_dicom_folder_and_mhd_data_file_changes_invalidate(tmp_path):
    folder = write_dicom_series(tmp_path / "series", ct_volume((16, 16, 5)), "1.2.826.0.1.3680043.2.1125.7")
    header = write_image(tmp_path / "vol.mhd", ct_volume())
    cases = [Case("series", folder), Case("vol", header)]
    before = ensure_cached(cases, PLAIN, tmp_path / "cache")

    _touch_later(sorted(folder.iterdir())[2])  # one slice of the series
    _touch_later(tmp_path / "vol.raw")  # the data file named by the .mhd header
    after = ensure_cached(cases, PLAIN, tmp_path / "cache")

    assert all(a.image.parent != b.image.parent for a, b in zip(after, before))


def test_entries_are_memory_mapped_and_describe_the_geometry(tmp_path):
    image = ct_volume((30, 28, 10))
    label = np.zeros((30, 28, 10), np.uint8)
    label[10:20, 10:20, 2:8] = 3
    case = Case(
        "ct",
        write_image(tmp_path / "ct.nii.gz", image, spacing=(0.75, 0.75, 2.5)),
        write_image(tmp_path / "lab.nii.gz", label, spacing=(0.75, 0.75, 2.5)),
    )
    settings = Preprocessing(orientation="RAS", spacing=(1.5, 1.5, 2.0))

    (volume,) = ensure_cached([case], settings, tmp_path / "cache")
    array, affine = read_cached_array(volume.image)
    labels, _ = read_cached_array(volume.label)
    meta = volume.meta

    assert isinstance(array, np.memmap) and array.dtype == np.float32 and labels.dtype == np.uint8
    assert list(array.shape) == meta["shape"] and meta["shape"][1:] == [15, 14, 12]
    np.testing.assert_allclose(affine, meta["affine"])
    np.testing.assert_allclose(meta["spacing"], (1.5, 1.5, 2.0))
    assert meta["orientation"] == "RAS" and meta["preprocessing"] == settings.to_dict()
    assert meta["original"]["shape"] == [30, 28, 10] and meta["original"]["orientation"] == "LPS"
    np.testing.assert_allclose(meta["original"]["spacing"], (0.75, 0.75, 2.5))
    assert meta["source"] == {"image": str(case.image), "label": str(case.label)}
    summary = meta["validation"]
    assert summary["finite"]
    assert summary["intensity"] == pytest.approx(
        {"min": array.min(), "max": array.max(), "mean": array.mean(), "std": array.std()}, rel=1e-5
    )
    assert set(summary["label_voxels"]) == {"0", "3"} and sum(summary["label_voxels"].values()) == labels.size


def test_subjects_stay_lazy_until_sampled_and_then_map_without_copying(tmp_path):
    cases = [Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()))]
    (volume,) = ensure_cached(cases, PLAIN, tmp_path / "cache")

    subject = volume_subject(volume)
    assert dict.get(subject["image"], tio.DATA) is None  # nothing read yet
    attach_memory_maps(subject)
    mapped, _ = read_cached_array(volume.image)

    np.testing.assert_array_equal(subject["image"].data.numpy(), mapped)
    assert mapped_file(subject["image"].data.data_ptr()) == str(volume.image)  # the file's pages, not a copy
    with pytest.raises(DataSourceError, match="no label map was cached"):
        volume_subject(volume, with_label=True)


def test_a_volume_keeps_one_mapping_per_process_until_its_file_is_replaced(tmp_path):
    (volume,) = ensure_cached([Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()))], PLAIN, tmp_path / "cache")
    first, _ = read_cached_array(volume.image)
    again, _ = read_cached_array(volume.image)
    assert again is first  # reused: no new mapping and page faults per subject load

    replacement = tmp_path / "replacement.npy"
    np.save(replacement, np.full(first.shape, 7.0, np.float32))
    os.replace(replacement, volume.image)  # an entry rebuilt in place
    rebuilt, _ = read_cached_array(volume.image)
    assert rebuilt is not first and float(rebuilt.max()) == 7.0


def test_all_bad_cases_are_reported_together_before_anything_trains(tmp_path):
    good = write_image(tmp_path / "good.nii.gz", ct_volume())
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    flat = write_image(tmp_path / "flat.nii.gz", np.zeros((16, 16, 1), np.int16))
    label = write_image(tmp_path / "small_label.nii.gz", np.zeros((10, 10, 10), np.uint8))
    cases = [Case("good", good), Case("empty", empty), Case("flat", flat), Case("mismatch", good, label)]

    with pytest.raises(DataSourceError) as error:
        ensure_cached(cases, PLAIN, tmp_path / "cache")

    message = str(error.value)
    assert message.startswith("3 of 4 case(s) cannot be used")
    assert f"empty: {empty}: file is empty" in message
    assert f"flat: {flat}: image is 2D" in message
    assert f"mismatch: {label}: label geometry differs from its image" in message
    assert "good:" not in message


def test_default_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LMIM_CACHE_DIR", str(tmp_path / "from-env"))
    (volume,) = ensure_cached([Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()))], PLAIN)

    assert default_cache_dir() == tmp_path / "from-env"
    assert volume.image.parent.parent == tmp_path / "from-env"


@pytest.mark.timeout(120)
def test_process_pool_gives_the_same_entries_as_in_process(tmp_path):
    """The pool path: cases and settings pickle, the worker imports in a fresh interpreter (~4 CPU-s each)."""
    cases = [Case(f"ct{i}", write_image(tmp_path / f"ct{i}.nii.gz", ct_volume(seed=i))) for i in range(3)]
    settings = preset("ct_abdomen_btcv")

    pooled = ensure_cached(cases, settings, tmp_path / "pooled", num_workers=2)
    serial = ensure_cached(cases, settings, tmp_path / "serial", num_workers=0)

    assert [v.case_id for v in pooled] == ["ct0", "ct1", "ct2"]
    for a, b in zip(pooled, serial):
        np.testing.assert_array_equal(np.load(a.image), np.load(b.image))
        assert a.image.parent.name == b.image.parent.name  # same key


def test_a_declared_multichannel_volume_is_cached_with_its_channels(tmp_path):
    rng = np.random.default_rng(0)
    channels = np.zeros((20, 18, 10, 2), np.float32)
    channels[4:16, 4:14, 2:8, 0] = rng.normal(400, 40, (12, 10, 6))
    channels[4:16, 4:14, 2:8, 1] = rng.normal(80, 5, (12, 10, 6))
    path = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(channels, np.diag([1.0, 1.0, 1.5, 1.0])), path)

    with pytest.raises(DataSourceError, match="expected 1"):
        ensure_cached([Case("mri", path)], preset("mri_zscore"), tmp_path / "cache")
    (volume,) = ensure_cached([Case("mri", path)], preset("mri_zscore"), tmp_path / "cache", channels=2)

    array, _ = read_cached_array(volume.image)
    assert array.shape == (2, 12, 10, 6)  # cropped to the non-zero foreground
    for channel in array:
        assert channel.mean() == pytest.approx(0, abs=1e-4) and channel.std() == pytest.approx(1, abs=1e-2)


@pytest.mark.parametrize("storage", ["float16", "int16"])
def test_a_compact_cache_halves_the_disk_and_decodes_patches_within_its_stated_precision(tmp_path, storage):
    from data_modules.cache import MemoryMappedUniformSampler, decode_voxels

    cases = [Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()))]
    windowed = Preprocessing(orientation="RAS", spacing=None, window=(-175.0, 250.0))
    (exact,) = ensure_cached(cases, windowed, tmp_path / "cache")
    (compact,) = ensure_cached(cases, windowed, tmp_path / "cache", storage=storage)
    assert compact.image.parent != exact.image.parent  # the storage is part of the key: both entries coexist
    assert compact.image.stat().st_size < 0.55 * exact.image.stat().st_size

    reference, _ = read_cached_array(exact.image)
    stored, _ = read_cached_array(compact.image)
    assert stored.dtype == np.dtype(storage)
    decoded = decode_voxels(stored, compact.image).numpy()
    scale = np.abs(reference).max()
    bound = 2.0**-11 * scale if storage == "float16" else compact.meta["storage"]["max_abs_error"] + 2**-23 * scale  # + float32 rounding
    assert np.abs(decoded - reference).max() <= bound
    assert np.abs(decoded - reference).max() > 0  # lossy indeed: the bound is what is checked, not equality

    # the training sampler hands out float32 patches decoded from the compact entry
    patch = next(MemoryMappedUniformSampler((8, 8, 8))(volume_subject(compact), 1))
    start = patch[tio.LOCATION][:3].tolist()
    window = reference[:, start[0]:start[0] + 8, start[1]:start[1] + 8, start[2]:start[2] + 8]
    assert patch["image"].data.dtype == torch.float32
    assert np.abs(patch["image"].data.numpy() - window).max() <= bound


@pytest.mark.parametrize("storage", ["float32_blosc2", "int16_blosc2"])
def test_a_compressed_cache_stores_its_format_losslessly_in_under_half_the_disk(tmp_path, storage, monkeypatch):
    from data_modules import cache
    from data_modules.cache import COMPRESSED_IMAGE_FILE, MemoryMappedUniformSampler, decode_voxels

    cases = [Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume((80, 72, 40))))]
    windowed = Preprocessing(orientation="RAS", spacing=None, window=(-175.0, 250.0))
    (exact,) = ensure_cached(cases, windowed, tmp_path / "cache")
    (uncompressed,) = ensure_cached(cases, windowed, tmp_path / "cache", storage=storage.removesuffix("_blosc2"))
    (compressed,) = ensure_cached(cases, windowed, tmp_path / "cache", storage=storage)
    assert compressed.image.name == COMPRESSED_IMAGE_FILE and compressed.image.parent != uncompressed.image.parent
    assert compressed.image.stat().st_size < 0.5 * exact.image.stat().st_size

    stored, _ = read_cached_array(compressed.image)
    reference, _ = read_cached_array(uncompressed.image)
    assert stored.dtype == reference.dtype and np.array_equal(stored, reference)  # compression adds no error
    (reloaded,) = ensure_cached(cases, windowed, tmp_path / "cache", storage=storage)
    assert reloaded.image == compressed.image  # found again, not rewritten

    # Patches are read block by block (each 40-voxel side crosses a 32³ block), never the whole volume.
    monkeypatch.setattr(cache, "decompress", lambda path: pytest.fail("a patch sampler decompressed a whole volume"))
    subject = volume_subject(compressed)
    for patch in MemoryMappedUniformSampler((40, 40, 24))(subject, 3):
        start = patch[tio.LOCATION][:3].tolist()
        window = decode_voxels(reference, uncompressed.image)[:, start[0]:start[0] + 40, start[1]:start[1] + 40,
                                                               start[2]:start[2] + 24]
        data = patch["image"].data
        assert data.dtype == torch.float32 and torch.equal(data, window)
    assert subject["image"].data.stride() == (0, 0, 0, 0)  # the sampled subject holds no voxels


def test_a_cache_entry_fsyncs_each_file_before_its_rename_and_its_folder_once_after_the_sidecar(tmp_path, monkeypatch):
    from lightning_mim import run_files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}")).name))
        real_fsync(descriptor)

    def replace(source, destination) -> None:
        events.append(("replace", Path(destination).name))
        real_replace(source, destination)

    case = Case("ct", write_image(tmp_path / "ct.nii.gz", ct_volume()), write_image(tmp_path / "label.nii.gz",
                                                                                   np.ones((24, 20, 12), np.uint8)))
    monkeypatch.setattr(run_files.os, "fsync", fsync)
    monkeypatch.setattr(run_files.os, "replace", replace)
    (volume,) = ensure_cached([case], Preprocessing(orientation="RAS", spacing=None), tmp_path / "cache")

    files = [name for kind, name in events if kind == "replace"]
    assert files == ["image.npy", "label.npy", "meta.json"]  # the sidecar, which marks the entry finished, last
    synced = [name for kind, name in events if kind == "fsync"]
    assert synced.count(volume.image.parent.name) == 1 and synced[-1] == volume.image.parent.name
    assert len(synced) == len(files) + 1  # every file's temporary, then the folder once
