"""Case discovery from folders, DICOM series, CSV and dataset.json, and reading with clear errors."""

from __future__ import annotations

import gzip
import json
import locale

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from volume_files import ct_volume, write_dicom_series, write_image

from data_modules import (
    Case,
    DataSourceError,
    cases_from_csv,
    cases_from_datalist,
    cases_from_folder,
    read_image,
    read_label,
    split_by_subject,
)
from data_modules.sources import read_image_as_stored

SERIES_A = "1.2.826.0.1.3680043.2.1125.2"
SERIES_B = "1.2.826.0.1.3680043.2.1125.3"


def test_folder_finds_every_format_recursively_and_ignores_the_rest(tmp_path):
    volume = ct_volume()
    write_image(tmp_path / "a.nii.gz", volume)
    write_image(tmp_path / "nested" / "b.nrrd", volume)
    write_image(tmp_path / "nested" / "deeper" / "c.mha", volume)
    write_image(tmp_path / "d.mhd", volume)  # writes d.raw next to it
    write_dicom_series(tmp_path / "patient" / "ct", volume, SERIES_A)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.nii.gz").write_bytes(b"")

    cases = cases_from_folder(tmp_path)

    assert {c.case_id: c.image.relative_to(tmp_path).as_posix() for c in cases} == {
        "a": "a.nii.gz",
        "nested/b": "nested/b.nrrd",
        "nested/deeper/c": "nested/deeper/c.mha",
        "d": "d.mhd",
        "patient/ct": "patient/ct",
    }
    for case in cases:
        assert read_image(case.image).spatial_shape == volume.shape, case.case_id


def test_dicom_series_is_read_back_with_values_and_geometry(tmp_path):
    volume = ct_volume(shape=(20, 16, 6), seed=1)
    folder = write_dicom_series(tmp_path / "series", volume, SERIES_A, spacing=(0.7, 0.8, 2.5), origin=(-10, 5, 100))

    encoding_before = locale.getpreferredencoding(False).lower().replace("-", "")
    (case,) = cases_from_folder(folder)
    image = read_image(case.image)

    assert case.case_id == "series"
    np.testing.assert_array_equal(image.data[0].numpy(), volume)
    np.testing.assert_allclose(image.spacing, (0.7, 0.8, 2.5), atol=1e-4)
    # DICOM is LPS: origin (-10, 5, 100) is (10, -5, 100) in TorchIO's RAS world.
    np.testing.assert_allclose(image.origin, (10, -5, 100), atol=1e-4)
    assert image.orientation_str == "LPS"
    # GDCM's switch to the C locale must not leak: later text files would decode as ASCII.
    assert locale.getpreferredencoding(False).lower().replace("-", "") == encoding_before


def test_two_series_mixed_in_one_folder_is_an_error_naming_both(tmp_path):
    volume = ct_volume(shape=(12, 12, 4))
    write_dicom_series(tmp_path / "mixed", volume, SERIES_A, prefix="a")
    write_dicom_series(tmp_path / "mixed", volume, SERIES_B, prefix="b")

    with pytest.raises(DataSourceError) as error:
        cases_from_folder(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "mixed") in message and SERIES_A in message and SERIES_B in message


def test_folder_errors_name_the_folder_and_what_was_found(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        cases_from_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match=r"empty.*folder is empty"):
        cases_from_folder(tmp_path / "empty")
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("a.txt", "b.txt", "scan.png"):
        (junk / name).write_text("x")
    with pytest.raises(DataSourceError) as error:
        cases_from_folder(junk)
    assert "no usable images" in str(error.value) and ".txt (2)" in str(error.value) and ".png (1)" in str(error.value)


def test_csv_resolves_relative_paths_and_reads_ids_and_labels(tmp_path):
    write_image(tmp_path / "img" / "one.nii.gz", ct_volume())
    write_image(tmp_path / "img" / "two.nii.gz", ct_volume())
    write_image(tmp_path / "lab" / "one.nii.gz", np.zeros((24, 20, 12), np.uint8))
    (tmp_path / "list.csv").write_text(
        f"image,label,case_id\nimg/one.nii.gz,lab/one.nii.gz,first\n{tmp_path / 'img' / 'two.nii.gz'},,\n"
    )

    cases = cases_from_csv(tmp_path / "list.csv")

    assert cases == [
        Case("first", tmp_path / "img" / "one.nii.gz", tmp_path / "lab" / "one.nii.gz"),
        Case("two", tmp_path / "img" / "two.nii.gz", None),
    ]
    assert cases_from_csv(tmp_path / "list.csv", with_labels=False)[0].label is None


def test_csv_missing_files_are_reported_by_line_and_path(tmp_path):
    write_image(tmp_path / "ok.nii.gz", ct_volume())
    (tmp_path / "list.csv").write_text("image,label\nok.nii.gz,\ngone.nii.gz,\nok.nii.gz,nolabel.nii.gz\n")

    with pytest.raises(DataSourceError) as error:
        cases_from_csv(tmp_path / "list.csv")
    message = str(error.value)
    assert f"line 3: image {tmp_path / 'gone.nii.gz'} does not exist" in message
    assert f"line 4: label {tmp_path / 'nolabel.nii.gz'} does not exist" in message
    # Pre-training ignores labels, so a missing label file does not block it; the image still does.
    with pytest.raises(DataSourceError, match="line 3") as error:
        cases_from_csv(tmp_path / "list.csv", with_labels=False)
    assert "line 4" not in str(error.value)

    (tmp_path / "bad.csv").write_text("path\nok.nii.gz\n")
    with pytest.raises(DataSourceError, match="'image' column"):
        cases_from_csv(tmp_path / "bad.csv")


def _msd_layout(root, names=("la_003", "la_004"), test_names=("la_001",)):
    for name in (*names, *test_names):
        write_image(root / "imagesTr" / f"{name}.nii.gz", ct_volume())
        write_image(root / "labelsTr" / f"{name}.nii.gz", np.zeros((24, 20, 12), np.uint8))
    content = {
        "name": "Test",
        "labels": {"0": "background", "1": "organ"},
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
        "test": [f"./imagesTr/{n}.nii.gz" for n in test_names],
    }
    (root / "dataset.json").write_text(json.dumps(content))
    return root / "dataset.json"


def test_msd_datalist_training_and_plain_string_test_sections(tmp_path):
    datalist = _msd_layout(tmp_path)

    training = cases_from_datalist(datalist, "training")
    test = cases_from_datalist(datalist, "test")

    assert [(c.case_id, c.label.name) for c in training] == [("la_003", "la_003.nii.gz"), ("la_004", "la_004.nii.gz")]
    assert training[0].image == tmp_path / "imagesTr" / "la_003.nii.gz"
    assert [(c.case_id, c.label) for c in test] == [("la_001", None)]


def test_btcv_dataset_0_json_with_validation_section(tmp_path):
    for i in (1, 2, 35):
        write_image(tmp_path / "imagesTr" / f"img{i:04d}.nii.gz", ct_volume())
        write_image(tmp_path / "labelsTr" / f"label{i:04d}.nii.gz", np.zeros((24, 20, 12), np.uint8))
    def pairs(ids):
        return [{"image": f"imagesTr/img{i:04d}.nii.gz", "label": f"labelsTr/label{i:04d}.nii.gz"} for i in ids]

    (tmp_path / "dataset_0.json").write_text(json.dumps({"training": pairs([1, 2]), "validation": pairs([35])}))

    validation = cases_from_datalist(tmp_path / "dataset_0.json", key="validation")

    assert [(c.case_id, c.label.name) for c in validation] == [("img0035", "label0035.nii.gz")]
    assert len(cases_from_datalist(tmp_path / "dataset_0.json", key="training")) == 2
    absent = r"no 'test' section; list sections present: \['training', 'validation'\]"
    with pytest.raises(DataSourceError, match=absent):
        cases_from_datalist(tmp_path / "dataset_0.json", key="test")


def test_datalist_errors_name_the_file_and_the_entry(tmp_path):
    datalist = _msd_layout(tmp_path)
    content = json.loads(datalist.read_text())

    content["training"].append({"label": "./labelsTr/la_003.nii.gz"})
    datalist.write_text(json.dumps(content))
    with pytest.raises(DataSourceError, match=rf"{datalist}: entry 2 of 'training' is malformed"):
        cases_from_datalist(datalist)

    content["training"][2] = {"image": "./imagesTr/gone.nii.gz"}
    datalist.write_text(json.dumps(content))
    missing = tmp_path / "imagesTr" / "gone.nii.gz"
    with pytest.raises(DataSourceError, match=rf"entry 2: image {missing} does not exist"):
        cases_from_datalist(datalist)

    datalist.write_text("{not json")
    with pytest.raises(DataSourceError, match="not valid JSON"):
        cases_from_datalist(datalist)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda data: b"", "file is empty"),
        (lambda data: data[: len(data) // 2], "compressed data is truncated or corrupt"),
        (lambda data: data[:200] + bytes(50) + data[250:], "compressed data is truncated or corrupt"),
        (lambda data: b"not an image at all" * 20, "not a readable NIfTI"),
    ],
    ids=["zero-byte", "truncated-gz", "corrupt-gz", "garbage"],
)
def test_broken_nifti_files_are_rejected_with_the_path(tmp_path, damage, expected):
    good = write_image(tmp_path / "good.nii.gz", ct_volume())
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(damage(good.read_bytes()))

    with pytest.raises(DataSourceError, match=expected) as error:
        read_image(bad)
    assert str(bad) in str(error.value)


def test_truncated_uncompressed_nifti_is_rejected(tmp_path):
    good = write_image(tmp_path / "good.nii", ct_volume())
    bad = tmp_path / "bad.nii"
    bad.write_bytes(good.read_bytes()[:-1000])

    with pytest.raises(DataSourceError, match=r"file is truncated: \d+ bytes of data, the header needs \d+"):
        read_image(bad)


def nifti_gz(path, array, endianness="<", slope=1.0, inter=0.0):
    image = nib.Nifti1Image(array, np.diag([0.8, 0.9, 2.5, 1.0]), header=nib.Nifti1Header(endianness=endianness))
    image.header.set_slope_inter(slope, inter)
    image.set_data_dtype(array.dtype)  # as given, also when scaled
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("stored", ["int16", "uint16", "float32", "big-endian", "scaled", "two-channel"])
def test_a_nii_gz_is_inflated_once_and_read_as_torchio_reads_it(tmp_path, stored, inflations):
    volume = ct_volume((40, 36, 24))
    array, layout, channels = {
        "int16": (volume, {}, 1),
        "uint16": ((volume + 1024).astype(np.uint16), {}, 1),
        "float32": (volume.astype(np.float32) / 7, {}, 1),
        "big-endian": (volume, {"endianness": ">"}, 1),
        "scaled": ((volume + 1024).astype(np.uint16), {"inter": -1024.0}, 1),
        "two-channel": (np.stack([volume, volume // 2], axis=-1), {}, 2),
    }[stored]
    path = nifti_gz(tmp_path / "volume.nii.gz", array, **layout)

    image, voxels = read_image_as_stored(path, channels)
    assert inflations(path) == pytest.approx(1.0, abs=0.02)  # checked complete on the same inflate
    reference = tio.ScalarImage(path)
    reference.load()
    assert image.data.dtype == reference.data.dtype and torch.equal(image.data, reference.data)
    assert image.data.is_contiguous() and np.array_equal(image.affine, reference.affine)
    assert image.path == path and voxels is image.data


def test_nan_in_a_float_nii_gz_reaches_the_checks_and_an_odd_but_whole_stream_is_read(tmp_path):
    array = ct_volume((40, 36, 24)).astype(np.float32)
    array[3, 4, 5] = np.nan
    image, voxels = read_image_as_stored(nifti_gz(tmp_path / "nan.nii.gz", array))
    assert int(torch.isnan(voxels).sum()) == 1 and not torch.isnan(image.data).any()  # ITK zeroes NaN

    whole = nifti_gz(tmp_path / "whole.nii.gz", ct_volume((40, 36, 24)))
    raw = gzip.decompress(whole.read_bytes())
    two_members = tmp_path / "two_members.nii.gz"  # valid gzip, but the trailer covers only the second part
    two_members.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert torch.equal(read_image(two_members).data, read_image(whole).data)


def test_missing_path_2d_image_and_4d_image_errors(tmp_path):
    with pytest.raises(DataSourceError, match="no such file or folder"):
        read_image(tmp_path / "nothing.nii.gz")

    flat = write_image(tmp_path / "flat.nrrd", np.zeros((32, 32, 1), np.int16))
    with pytest.raises(DataSourceError, match=r"flat.nrrd: image is 2D \(size 32 x 32 x 1\)"):
        read_image(flat)

    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 8, 2), dtype=np.float32), np.eye(4)), four_d)
    with pytest.raises(DataSourceError, match=r"2 channels/volumes \(4D\), expected 1 \(declare channels=2"):
        read_image(four_d)
    assert read_image(four_d, channels=2).shape == (2, 16, 16, 8)


def test_label_maps_must_hold_integer_classes(tmp_path):
    good = write_image(tmp_path / "label.nii.gz", np.arange(24 * 20 * 12).reshape(24, 20, 12) % 3)
    assert read_label(good).data.unique().tolist() == [0, 1, 2]
    fractional = write_image(tmp_path / "soft.nii.gz", np.full((24, 20, 12), 0.5, np.float32))
    with pytest.raises(DataSourceError, match="soft.nii.gz: label map holds non-integer values"):
        read_label(fractional)


def test_subject_split_is_disjoint_reproducible_and_seeded():
    cases = [Case(f"case{i:02d}", None) for i in range(20)]

    train, val = split_by_subject(cases, 0.2, seed=0)
    again = split_by_subject(list(reversed(cases)), 0.2, seed=0)
    other = split_by_subject(cases, 0.2, seed=1)

    assert len(val) == 4 and len(train) == 16
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    assert (train, val) == again  # independent of discovery order
    assert {c.case_id for c in other[1]} != {c.case_id for c in val}
    assert split_by_subject(cases[:2], 0.01, seed=0)[1] != []  # at least one held out
    with pytest.raises(DataSourceError, match="at least 2 cases"):
        split_by_subject(cases[:1], 0.1, seed=0)
