"""The embedded phantom cohort: deterministic, cached, anatomically plausible, MSD-style."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from data_modules import ORGAN_NAMES, cases_from_datalist, ensure_phantom_cohort, read_image, read_label

SHAPE, SPACING = (48, 48, 24), (0.9, 0.9, 2.5)


def _arrays(datalist, index=0):
    entry = json.loads(datalist.read_text())["training"][index]
    def load(key):
        return np.asanyarray(nib.load(datalist.parent / entry[key]).dataobj)
    return load("image"), load("label")


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, phantom_datalist):
    again = ensure_phantom_cohort(tmp_path / "again", num_cases=4, shape=SHAPE, spacing=SPACING, seed=0)
    other = ensure_phantom_cohort(tmp_path / "other", num_cases=4, shape=SHAPE, spacing=SPACING, seed=1)

    for name in ("imagesTr/phantom_000.nii.gz", "labelsTr/phantom_003.nii.gz"):
        assert (again.parent / name).read_bytes() == (phantom_datalist.parent / name).read_bytes()
    assert not np.array_equal(_arrays(other)[0], _arrays(phantom_datalist)[0])
    assert not np.array_equal(_arrays(phantom_datalist, 0)[0], _arrays(phantom_datalist, 1)[0])  # cases differ


def test_existing_cohort_is_reused_without_rewriting(phantom_datalist):
    stamps = {p: p.stat().st_mtime_ns for p in phantom_datalist.parent.rglob("*") if p.is_file()}

    again = ensure_phantom_cohort(phantom_datalist.parent.parent, num_cases=4, shape=SHAPE, spacing=SPACING, seed=0)

    assert again == phantom_datalist
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_every_organ_is_labelled_with_plausible_hounsfield_units(phantom_datalist):
    median_hu = {}
    for index in range(4):
        image, label = _arrays(phantom_datalist, index)
        assert image.dtype == np.int16 and label.dtype == np.uint8 and image.shape == label.shape == SHAPE
        assert set(np.unique(label)) == set(range(len(ORGAN_NAMES) + 1)), f"case {index} misses an organ"
        assert -1024 <= image.min() and image.max() <= 3071
        assert np.median(image[0]) < -900 and np.median(image[:, :, SHAPE[2] // 2][label[:, :, SHAPE[2] // 2] == 0]) < 0
        # (the first sagittal plane is outside the body: air; the mid-slice background is air and fat)
        for organ, value in enumerate(ORGAN_NAMES, start=1):
            median_hu.setdefault(value, []).append(float(np.median(image[label == organ])))
    median = {organ: np.median(values) for organ, values in median_hu.items()}
    assert 40 <= median["liver"] <= 80 and 30 <= median["spleen"] <= 70 and 20 <= median["pancreas"] <= 60
    assert median["aorta"] >= 130 and median["spine"] >= 250
    # Enhancing cortex around a water-like medulla; the contrast phase varies between cases (generator v2).
    assert min(median["right_kidney"], median["left_kidney"]) >= 50
    assert median["stomach"] <= 30  # water and gas contents


def test_datalist_is_msd_style_and_readable_through_the_sources(phantom_datalist):
    content = json.loads(phantom_datalist.read_text())
    assert content["labels"] == {"0": "background", **{str(i + 1): n for i, n in enumerate(ORGAN_NAMES)}}
    assert content["numTraining"] == 4 and content["modality"] == {"0": "CT"}

    cases = cases_from_datalist(phantom_datalist, "training")
    image = read_image(cases[0].image)
    label = read_label(cases[0].label)

    assert [c.case_id for c in cases] == [f"phantom_{i:03d}" for i in range(4)]
    assert image.orientation_str == "RAS" and image.spatial_shape == SHAPE
    np.testing.assert_allclose(image.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(label.affine, image.affine)
    np.testing.assert_allclose(image.get_center(), (0, 0, 0), atol=1e-4)
