"""Sliding-window inference, per-organ metrics, result files and predictions in the original geometry."""

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from data_modules.cache import ensure_cached, read_cached_array
from data_modules.presets import Preprocessing, preset
from data_modules.sources import Case
from lightning_mim.segmentation.evaluation import (
    case_metrics,
    gather_by_case,
    mean_dice,
    metric_rows,
    organ_summary,
    read_metrics_csv,
    sliding_window_logits,
    summary_markdown,
    write_metrics_csv,
    write_prediction,
)


def test_dice_equals_the_hand_computed_value():
    label = torch.zeros(10, 10, 10, dtype=torch.long)
    prediction = torch.zeros_like(label)
    label[0:4, 0:5, 0:5] = 1  # 100 voxels
    prediction[2:6, 0:5, 0:5] = 1  # 100 voxels, 50 shared
    label[7:9, 7:9, 7:9] = 2  # 8 voxels, not predicted at all
    metrics = case_metrics(prediction, label, num_classes=4, hd95=False)
    assert metrics["dice"][0] == pytest.approx(2 * 50 / (100 + 100))
    assert metrics["dice"][1] == 0.0
    assert math.isnan(metrics["dice"][2])  # class 3 absent from the ground truth: no value
    assert "hd95" not in metrics


def test_hd95_is_in_millimetres_of_the_given_spacing():
    label = torch.zeros(20, 20, 20, dtype=torch.long)
    label[5:10, 5:10, 5:10] = 1
    shifted = torch.roll(label, shifts=2, dims=0)  # every surface voxel moves 2 voxels along axis 0
    metrics = case_metrics(shifted, label, num_classes=2, spacing=(1.5, 1.0, 1.0))
    assert metrics["hd95"][0] == pytest.approx(3.0)
    missed = case_metrics(torch.zeros_like(label), label, num_classes=2, spacing=(1.0, 1.0, 1.0))
    assert missed["dice"][0] == 0.0 and math.isnan(missed["hd95"][0])


def test_sliding_window_covers_volumes_larger_and_smaller_than_the_roi():
    def predictor(x):  # voxel-wise, so any correct stitching reproduces it exactly
        return torch.cat([x, 2 * x, -x], dim=1)

    large = torch.rand(1, 1, 50, 37, 29)
    out = sliding_window_logits(predictor, large, (16, 16, 16), sw_batch_size=3, overlap=0.5, mode="gaussian")
    assert out.shape == (1, 3, 50, 37, 29)
    assert torch.allclose(out, predictor(large), atol=1e-5)
    small = torch.rand(1, 1, 10, 20, 12)
    out = sliding_window_logits(predictor, small, (16, 16, 16), stitch_device="cpu", mode="constant")
    assert out.shape == (1, 3, 10, 20, 12) and out.device.type == "cpu"
    assert torch.allclose(out, predictor(small), atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_logits(predictor, small, (16, 16, 16), overlap=1.0)


def test_results_are_deduplicated_by_case():
    results = [{"case_id": "b", "dice": [0.5]}, {"case_id": "a", "dice": [0.1]}, {"case_id": "b", "dice": [0.5]}]
    assert [r["case_id"] for r in gather_by_case(results)] == ["a", "b"]


def test_csv_round_trip_and_markdown_summary(tmp_path):
    results = [{"case_id": "c1", "dice": [0.8, 0.4], "hd95": [2.0, float("nan")]},
               {"case_id": "c2", "dice": [0.6, float("nan")], "hd95": [4.0, float("nan")]}]
    rows = metric_rows(results, ["background", "liver", "spleen"], method="mae3d", label_fraction=0.25, num_labelled=3, seed=0)
    path = write_metrics_csv(rows, tmp_path / "test_metrics.csv")
    back = read_metrics_csv(path)
    assert [(r["method"], r["label_fraction"], r["case_id"], r["organ"]) for r in back][:2] == [
        ("mae3d", 0.25, "c1", "liver"), ("mae3d", 0.25, "c1", "spleen")]
    assert math.isnan(back[3]["dice"]) and back[0]["dice"] == pytest.approx(0.8)
    summary = organ_summary(back)
    assert summary[0]["dice_mean"] == pytest.approx(0.7) and summary[0]["hd95_mean"] == pytest.approx(3.0)
    assert summary[1]["dice_mean"] == pytest.approx(0.4) and summary[1]["cases"] == 1
    assert mean_dice(summary) == pytest.approx(0.55)
    text = summary_markdown(back, "Test")
    assert "| liver | 0.7000 ± 0.1000 |" in text and "Mean Dice over organs: 0.5500" in text
    assert "background excluded" in text and "preprocessed (resampled) grid" in text


def _write_case(folder: Path, direction) -> tuple[Case, np.ndarray]:
    array = np.full((30, 40, 24), -1000, np.int16)  # SimpleITK order: z, y, x
    labels = np.zeros(array.shape, np.uint8)
    array[6:26, 8:34, 4:20] = 40
    labels[9:22, 12:30, 7:17] = 1
    labels[12:16, 15:20, 9:13] = 2
    for data, name in ((array, "image.nii.gz"), (labels, "label.nii.gz")):
        image = sitk.GetImageFromArray(data)
        image.SetSpacing((0.8, 1.1, 2.5))
        image.SetOrigin((12.5, -30.0, 77.0))
        image.SetDirection(direction)
        sitk.WriteImage(image, str(folder / name))
    return Case("case", folder / "image.nii.gz", folder / "label.nii.gz"), labels


def _round_trip(folder: Path, direction, preprocessing) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    case, labels = _write_case(folder, direction)
    (volume,) = ensure_cached([case], preprocessing, cache_dir=folder / "cache")
    cached_label, _ = read_cached_array(volume.label)
    geometry = {"preprocessed_affine": volume.meta["affine"], **volume.meta["original"]}
    path = write_prediction(torch.from_numpy(np.array(cached_label[0])), geometry, folder / "out" / "case.nii.gz")
    return sitk.ReadImage(str(path)), sitk.ReadImage(str(case.image)), labels


def _same_geometry(written: sitk.Image, source: sitk.Image) -> bool:
    return (written.GetSize() == source.GetSize()
            and np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-5)
            and np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
            and np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-5))


def test_prediction_undoes_reorientation_crop_and_padding_exactly(tmp_path: Path):
    """An L-P-S-like, oblique direction and a non-zero origin; no resampling, so the round trip is lossless."""
    angle = 0.4
    direction = (-np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), -np.cos(angle), 0.0, 0.0, 0.0, -1.0)
    lossless = Preprocessing(orientation="RAS", spacing=None, crop_foreground=True, pad_to=(32, 48, 32))
    written, source, labels = _round_trip(tmp_path, direction, lossless)
    assert _same_geometry(written, source)
    assert np.array_equal(sitk.GetArrayFromImage(written), labels)


def test_prediction_is_resampled_back_onto_the_original_grid(tmp_path: Path):
    angle = 0.4
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    written, source, labels = _round_trip(tmp_path, direction, preset("ct_abdomen_btcv").with_min_size((32, 32, 32)))
    assert _same_geometry(written, source)
    back = sitk.GetArrayFromImage(written)
    # 1.5 × 1.5 × 2 mm and back with nearest neighbour: blocky, but in place, and nothing leaks outside.
    foreground = 2 * ((back > 0) & (labels > 0)).sum() / ((back > 0).sum() + (labels > 0).sum())
    assert foreground > 0.85 and back[labels == 0].mean() < 0.05
    shift = np.argwhere(back == 1).mean(0) - np.argwhere(labels == 1).mean(0)
    assert np.abs(shift).max() < 1.0  # voxels of the original grid
