"""Preprocessing presets: the table of methods.md §2.1, settings as cache keys, and what apply() does."""

from __future__ import annotations

import numpy as np
import pytest
import torchio as tio
from volume_files import write_image

from data_modules import PRESETS, Preprocessing, PreprocessingError, preset, read_image, read_label


def _subject(tmp_path, image: np.ndarray, label: np.ndarray | None = None, **geometry) -> tio.Subject:
    images = {"image": read_image(write_image(tmp_path / "image.nii.gz", image, **geometry))}
    if label is not None:
        images["label"] = read_label(write_image(tmp_path / "label.nii.gz", label, **geometry))
    return tio.Subject(**images)


def test_named_presets_follow_the_methods_table():
    names = ("ct_abdomen_btcv", "ct_smit_pretrain", "ct_wide_pretrain", "ct_hybridmim_pretrain")
    btcv, smit, wide, hybrid = (preset(name) for name in names)
    assert (btcv.orientation, btcv.spacing, btcv.window, btcv.output_range, btcv.crop_foreground) == (
        "RAS",
        (1.5, 1.5, 2.0),
        (-175.0, 250.0),
        (0.0, 1.0),
        True,
    )
    assert (smit.orientation, smit.spacing, smit.window, smit.pad_to) == (
        "RAS",
        (2.0, 2.0, 2.0),
        (-175.0, 250.0),
        (128, 128, 128),
    )
    assert (wide.orientation, wide.spacing, wide.window, wide.output_range) == (
        "RAS",
        None,
        (-1000.0, 1000.0),
        (0.0, 1.0),
    )
    assert hybrid.output_range == (0.001, 1.0) and hybrid.window == wide.window
    assert preset("mri_zscore").intensity == "zscore_nonzero" and preset("pet_suv").intensity == "suv_zscore"
    assert {p.modality for p in PRESETS.values()} == {"ct", "mri", "pet"}
    with pytest.raises(ValueError, match=r"unknown preprocessing preset 'ct'; choose one of \['ct_abdomen_btcv'"):
        preset("ct")


def _readme_cells(preprocessing: Preprocessing) -> tuple[str, str, str]:
    """The README table's orientation, spacing and intensity cells for a preset."""
    spacing = preprocessing.spacing
    if spacing is None:
        spacing_cell = "native"
    elif len(set(spacing)) == 1:
        spacing_cell = f"{spacing[0]:.1f} iso"
    else:
        spacing_cell = " × ".join(f"{s:.1f}" for s in spacing)
    number = lambda v: f"{v:g}"  # noqa: E731
    intensity = {
        "window": "HU [{}, {}] → [{}, {}]".format(*map(number, (*preprocessing.window, *preprocessing.output_range))),
        "zscore_nonzero": "per-volume z-score over non-zero voxels",
        "suv_zscore": "SUV clip [{}, {}] + z-score".format(*map(number, preprocessing.suv_clip)),
        "none": "unchanged",
    }[preprocessing.intensity]
    return preprocessing.orientation or "file's own", spacing_cell, intensity


def test_every_preset_states_an_orientation_and_the_readme_table_matches_the_code():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4 and cells[0].strip("`") in PRESETS:
            rows[cells[0].strip("`")] = tuple(cells[1:])
    assert set(rows) == set(PRESETS), "the README preset table must list every preset exactly"
    for name, settings in PRESETS.items():
        assert settings.orientation is not None, f"{name} must state its orientation"
        assert rows[name] == _readme_cells(settings), name


def test_the_smit_preset_reorients_lps_files_like_the_fine_tuning_preset(tmp_path):
    volume = np.full((12, 10, 8), -1000, np.int16)
    volume[2:5, 3:9, 2:6] = 100  # an asymmetric block: any flip moves it
    subject = _subject(tmp_path, volume, spacing=(2.0, 2.0, 2.0))  # stored LPS
    smit = preset("ct_smit_pretrain").apply(subject)["image"]
    btcv = Preprocessing(**{**preset("ct_abdomen_btcv").to_dict(), "spacing": (2.0, 2.0, 2.0),
                            "crop_foreground": False}).apply(subject)["image"]
    assert smit.orientation_str == btcv.orientation_str == "RAS"


def test_settings_dict_and_fingerprint_are_stable_and_sensitive():
    from_lists = Preprocessing(spacing=[1.5, 1.5, 2], window=[-175, 250], pad_to=[96, 96, 96])
    from_tuples = Preprocessing(spacing=(1.5, 1.5, 2.0), window=(-175.0, 250.0), pad_to=(96, 96, 96))

    assert from_lists == from_tuples and from_lists.fingerprint() == from_tuples.fingerprint()
    assert from_lists.to_dict()["spacing"] == [1.5, 1.5, 2.0]
    assert Preprocessing(window=(-175, 251)).fingerprint() != Preprocessing().fingerprint()
    assert Preprocessing().with_min_size((96, 64, 200)).pad_to == (96, 64, 200)
    assert Preprocessing(pad_to=(128, 128, 128)).with_min_size((96, 96, 96)).pad_to == (128, 128, 128)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"window": (250, -175)}, "window must be"),
        ({"orientation": "RAR"}, "orientation must be 3 axis codes"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing must be positive"),
        ({"spacing": (1.0, 1.0)}, "spacing needs 3 values"),
    ],
)
def test_invalid_settings_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**fields)


def test_reorientation_to_ras_flips_lps_data(tmp_path):
    volume = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    subject = _subject(tmp_path, volume)  # SimpleITK identity direction = LPS
    assert subject["image"].orientation_str == "LPS"

    result = Preprocessing(orientation="RAS", intensity="none").apply(subject)

    assert result["image"].orientation_str == "RAS"
    np.testing.assert_array_equal(result["image"].data[0].numpy(), volume[::-1, ::-1, :])


def test_resampling_reaches_the_target_spacing_and_labels_stay_classes(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(0, 100, (40, 40, 20)).astype(np.float32)
    label = rng.integers(0, 4, (40, 40, 20)).astype(np.uint8)
    subject = _subject(tmp_path, image, label, spacing=(0.75, 0.75, 1.0))

    result = Preprocessing(orientation=None, spacing=(1.5, 1.5, 2.0), intensity="none").apply(subject)

    for name in ("image", "label"):
        np.testing.assert_allclose(result[name].spacing, (1.5, 1.5, 2.0))
        assert result[name].spatial_shape == (20, 20, 10)
    assert set(result["label"].data.unique().tolist()) <= {0, 1, 2, 3}  # nearest neighbour: no blends


def test_window_clips_and_rescales_hounsfield_units(tmp_path):
    volume = np.zeros((8, 8, 8), np.int16)
    volume.flat[:5] = [-1000, -175, 37, 250, 3000]
    subject = _subject(tmp_path, volume.astype(np.float32) + np.float32(0.5) * (volume == 37))  # 37.5 = mid-window

    result = Preprocessing(orientation=None).apply(subject)["image"].data.flatten()[:5]
    np.testing.assert_allclose(result.numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)

    hybrid = Preprocessing(orientation=None, window=(-1000, 1000), output_range=(0.001, 1.0)).apply(
        _subject(tmp_path, volume)
    )
    assert float(hybrid["image"].data.min()) == pytest.approx(0.001)


def test_foreground_crop_then_padding_keep_image_and_label_aligned(tmp_path):
    volume = np.full((30, 30, 20), -1000, np.int16)
    volume[5:15, 8:20, 2:12] = 100
    label = np.zeros_like(volume, dtype=np.uint8)
    label[6:9, 9:12, 3:5] = 2
    subject = _subject(tmp_path, volume, label)

    cropped = Preprocessing(orientation=None, crop_foreground=True).apply(subject)
    assert cropped["image"].spatial_shape == (10, 12, 10)
    assert cropped["label"].count_nonzero() == 3 * 3 * 2

    padded = Preprocessing(orientation=None, crop_foreground=True, pad_to=(16, 12, 14)).apply(subject)
    assert padded["image"].spatial_shape == padded["label"].spatial_shape == (16, 12, 14)
    image, labels = padded["image"].data, padded["label"].data
    assert float(image[0, 0, 0, 0]) == 0.0  # padded with the windowed background, not a fixed 0 HU
    assert labels.unique().tolist() == [0, 2] and padded["label"].count_nonzero() == 18
    # The bounding box moved by the padding offset, with the affine updated to keep positions.
    np.testing.assert_allclose(padded["image"].affine, padded["label"].affine)


def test_zscore_over_nonzero_voxels_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    volume = np.zeros((2, 12, 12, 8), np.float32)
    volume[0, 2:10, 2:10, 2:6] = rng.normal(300, 50, (8, 8, 4))
    volume[1, 2:10, 2:10, 2:6] = rng.normal(5, 2, (8, 8, 4))
    subject = tio.Subject(image=tio.ScalarImage(tensor=volume))

    result = Preprocessing(modality="mri", orientation=None, intensity="zscore_nonzero").apply(subject)["image"].data

    foreground = np.zeros((12, 12, 8), bool)
    foreground[2:10, 2:10, 2:6] = True
    for channel in result.numpy():
        inside = channel[foreground]
        assert inside.mean() == pytest.approx(0, abs=1e-5) and inside.std() == pytest.approx(1, abs=1e-2)
        assert not channel[~foreground].any()  # background stays exactly 0


def test_suv_is_clipped_before_the_zscore(tmp_path):
    volume = np.zeros((10, 10, 10), np.float32)
    volume[2:8, 2:8, 2:8] = 2.0
    volume[4, 4, 4] = 500.0  # hot spot above the clip
    subject = _subject(tmp_path, volume)

    result = preset("pet_suv").apply(subject)["image"].data
    values = np.where(volume > 0, np.minimum(volume, 20.0), 0)[volume > 0]
    expected_max = (20.0 - values.mean()) / values.std(ddof=1)
    assert float(result.max()) == pytest.approx(expected_max, rel=1e-4)


def test_nothing_above_the_foreground_threshold_is_an_error_naming_the_file(tmp_path):
    subject = _subject(tmp_path, np.full((10, 10, 10), -1000, np.int16))
    with pytest.raises(PreprocessingError, match=r"image.nii.gz: no voxel above the foreground threshold -175"):
        preset("ct_abdomen_btcv").apply(subject)


@pytest.mark.parametrize("spacing", [None, (1.5, 1.5, 2.0)])
def test_the_window_step_gives_exactly_torchios_clamp_and_rescale(tmp_path, spacing):
    rng = np.random.default_rng(3)
    volume = rng.integers(-1024, 1500, size=(20, 18, 12)).astype(np.int16)
    labels = (rng.random((20, 18, 12)) > 0.7).astype(np.uint8)
    settings = Preprocessing(modality="ct", orientation="RAS", spacing=spacing, window=(-175.0, 250.0),
                             output_range=(-1.0, 1.0))
    ours = settings.apply(_subject(tmp_path, volume, labels, spacing=(1.0, 1.2, 2.5)))

    reference = _subject(tmp_path, volume, labels, spacing=(1.0, 1.2, 2.5))
    reference = tio.ToCanonical()(reference)
    if spacing is not None:
        reference = tio.Resample(spacing)(reference)
    reference = tio.Compose([tio.Clamp(-175.0, 250.0),
                             tio.RescaleIntensity(out_min_max=(-1.0, 1.0), in_min_max=(-175.0, 250.0))])(reference)
    assert ours["image"].data.dtype == reference["image"].data.dtype
    assert np.array_equal(ours["image"].data.numpy(), reference["image"].data.numpy())  # bit for bit
    assert np.array_equal(ours["label"].data.numpy(), reference["label"].data.numpy())
    assert np.allclose(ours["image"].affine, reference["image"].affine)
