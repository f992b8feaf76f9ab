"""Whole-volume evaluation: sliding-window inference, per-organ metrics, result files, predictions on disk.

Metric protocol (the same for every method, methods.md §8.3):

* Dice and HD95 per organ from MONAI (``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)``),
  **background excluded**, computed on the **preprocessed (resampled) grid** — the cached volume
  the network sees, e.g. 1.5 × 1.5 × 2.0 mm for ``ct_abdomen_btcv`` — with HD95 in mm from that
  grid's spacing. Predictions written by ``predict`` are resampled back to the original grid, but
  the reported numbers are not computed there.
* An organ absent from a case's ground truth has no Dice/HD95 for that case (NaN, skipped by the
  means, MONAI ``ignore_empty``). An organ present in the ground truth but missing from the
  prediction has Dice 0 and HD95 NaN (MONAI gives no distance to an empty surface); the summary
  counts those cases.
* Means: per organ over cases, then over organs ("mean Dice").
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchio as tio
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import Tensor

from lightning_mim.run_files import atomic_path, atomic_write

#: Columns that describe the run, repeated on every row (``dataset``: see ``SegmentationDataModule.dataset_name``).
RUN_COLUMNS = ("dataset", "method", "label_fraction", "num_labelled", "seed")
CSV_COLUMNS = (*RUN_COLUMNS, "case_id", "class_index", "organ", "dice", "hd95", "nsd")
#: Columns a metrics CSV written before they existed may lack.
OPTIONAL_COLUMNS = ("dataset", "nsd")
METRIC_NOTE = ("Dice / HD95 (mm) per organ, background excluded, on the preprocessed (resampled) grid; "
               "NaN = organ absent from the ground truth (or, for HD95, from the prediction).")


def sliding_window_logits(
    predictor: Callable[[Tensor], Tensor],
    image: Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 1,
    overlap: float = 0.5,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    stitch_device: str | torch.device | None = None,
) -> Tensor:
    """Logits for a whole ``B×C×D×H×W`` volume from ROI-sized windows (MONAI ``sliding_window_inference``).

    Volumes smaller than the ROI are padded and cropped back, so the output always has the input's
    spatial shape. ``stitch_device="cpu"`` accumulates the output on the host (large CTs on a small
    GPU); windows still run on the image's device.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return sliding_window_inference(
        image, tuple(int(r) for r in roi_size), sw_batch_size, predictor, overlap=overlap, mode=mode,
        sigma_scale=sigma_scale, device=stitch_device, sw_device=image.device,
    )


def case_metrics(prediction: Tensor, label: Tensor, num_classes: int, spacing: Sequence[float] | None = None,
                 hd95: bool = True, nsd_tolerance: float | None = None) -> dict[str, list[float]]:
    """Per-organ Dice (and HD95 in mm, NSD) of one case; ``prediction``/``label`` are ``D×H×W`` class maps.

    ``nsd_tolerance``: also the normalised surface Dice at this tolerance (mm; voxels without
    ``spacing``), MONAI's ``compute_surface_dice``: the share of both surfaces lying within the
    tolerance of the other. Returns lists of ``num_classes − 1`` values (class 1 first); see the
    module docstring for NaNs (an organ absent from the ground truth has NSD NaN).
    """
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    pred = one_hot(prediction[None, None].long().cpu(), num_classes)
    true = one_hot(label[None, None].long().cpu(), num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, true)[0]
    out = {"dice": [float(v) for v in dice]}
    if hd95:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns for every empty organ; the NaN says the same
            distance = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
                pred, true, spacing=None if spacing is None else [float(s) for s in spacing])[0]
        out["hd95"] = [float(v) for v in distance]
    if nsd_tolerance is not None:
        out["nsd"] = surface_dice(pred, true, nsd_tolerance, spacing)
    return out


def surface_dice(pred: Tensor, true: Tensor, tolerance: float, spacing: Sequence[float] | None = None) -> list[float]:
    """NSD per foreground class of one-hot ``1×C×D×H×W`` maps; NaN where the ground truth lacks the class."""
    from monai.metrics import compute_surface_dice

    classes = int(pred.shape[1]) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty organ; the NaN says the same
        values = compute_surface_dice(pred, true, [float(tolerance)] * classes, include_background=False,
                                      spacing=None if spacing is None else [float(s) for s in spacing])[0]
    present = true[0, 1:].flatten(1).any(dim=1)
    return [float(v) if bool(p) else math.nan for v, p in zip(values, present)]


def gather_by_case(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-case results of all ranks, one per ``case_id`` (sorted): nothing is counted twice under DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, results)
        results = [item for part in gathered for item in (part or [])]
    unique = {item["case_id"]: item for item in results}
    return [unique[key] for key in sorted(unique)]


def metric_rows(results: Iterable[Mapping[str, Any]], class_names: Sequence[str], **columns: Any) -> list[dict[str, Any]]:
    """Long table, one row per case × organ, with ``columns`` (method, label_fraction, ...) repeated."""
    rows = []
    for result in results:
        for index, dice in enumerate(result["dice"], start=1):
            hd, nsd = result.get("hd95"), result.get("nsd")
            rows.append({**{c: columns.get(c) for c in RUN_COLUMNS}, "case_id": result["case_id"], "class_index": index,
                         "organ": class_names[index] if index < len(class_names) else f"class_{index}",
                         "dice": dice, "hd95": None if hd is None else hd[index - 1],
                         "nsd": None if nsd is None else nsd[index - 1]})
    return rows


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_metrics_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
    return atomic_write(path, text.getvalue())


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics CSV with numbers parsed (empty → None, ``nan`` → NaN)."""
    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(CSV_COLUMNS) - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a metrics CSV (missing columns {sorted(missing)})")
        rows = []
        for row in reader:
            rows.append({**row, "dataset": row.get("dataset") or None, "label_fraction": number(row["label_fraction"]),
                         "num_labelled": None if row["num_labelled"] == "" else int(float(row["num_labelled"])),
                         "class_index": int(row["class_index"]), "dice": number(row["dice"]), "hd95": number(row["hd95"]),
                         "nsd": number(row.get("nsd") or "")})
    return rows


def organ_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per organ (in class order): mean/std Dice and HD95 over cases, cases counted, cases with Dice 0."""
    by_organ: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_organ.setdefault((int(row["class_index"]), row["organ"]), []).append(row)
    summary = []
    for (index, organ), items in sorted(by_organ.items()):
        dice = np.array([r["dice"] for r in items if r["dice"] is not None and not math.isnan(r["dice"])])
        hd = np.array([r["hd95"] for r in items if r.get("hd95") is not None and not math.isnan(r["hd95"])])
        summary.append({
            "class_index": index, "organ": organ, "cases": int(dice.size),
            "dice_mean": float(dice.mean()) if dice.size else math.nan, "dice_std": float(dice.std()) if dice.size else math.nan,
            "hd95_mean": float(hd.mean()) if hd.size else math.nan, "hd95_std": float(hd.std()) if hd.size else math.nan,
            "zero_dice": int(sum(1 for r in items if r["dice"] == 0.0)),
        })
    return summary


def mean_dice(summary: Sequence[Mapping[str, Any]]) -> float:
    values = [s["dice_mean"] for s in summary if not math.isnan(s["dice_mean"])]
    return float(np.mean(values)) if values else math.nan


def summary_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """Mean ± std per organ and the mean Dice, as a Markdown document."""
    summary = organ_summary(rows)
    first = rows[0] if rows else {}
    lines = [f"# {title}", "",
             f"method **{first.get('method')}**, label fraction **{first.get('label_fraction')}** "
             f"({first.get('num_labelled')} labelled case(s)), seed {first.get('seed')}, "
             f"{len({r['case_id'] for r in rows})} test case(s).", "", METRIC_NOTE, "",
             "| organ | Dice (mean ± std) | HD95 mm (mean ± std) | cases | cases with Dice 0 |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['organ']} | {s['dice_mean']:.4f} ± {s['dice_std']:.4f} | {s['hd95_mean']:.2f} ± {s['hd95_std']:.2f} "
                     f"| {s['cases']} | {s['zero_dice']} |")
    lines += ["", f"**Mean Dice over organs: {mean_dice(summary):.4f}**", ""]
    return "\n".join(lines)


def write_summary_markdown(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "Test results") -> Path:
    return atomic_write(path, summary_markdown(rows, title))


def to_original_geometry(labels: Tensor, affine: np.ndarray | Sequence[Sequence[float]],
                         original_shape: Sequence[int], original_affine: np.ndarray | Sequence[Sequence[float]]) -> tio.LabelMap:
    """A class map on the preprocessed grid, resampled (nearest neighbour) onto the original image grid.

    ``affine`` is the preprocessed grid's (after reorientation, resampling, foreground crop and
    padding — TorchIO keeps it exact), so resampling in world coordinates undoes all of them at once:
    voxels outside the cropped region come back as background.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a D×H×W class map, got shape {tuple(labels.shape)}")
    dtype = torch.uint8 if int(labels.max()) <= 255 else torch.int16
    label_map = tio.LabelMap(tensor=labels[None].to(dtype).cpu(), affine=np.asarray(affine, dtype=np.float64))
    target = (tuple(int(s) for s in original_shape), np.asarray(original_affine, dtype=np.float64))
    return tio.Resample(target)(label_map)


def write_prediction(labels: Tensor, geometry: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``labels`` (preprocessed grid) as NIfTI in the case's original geometry.

    ``geometry`` is :meth:`data_modules.segmentation.SegmentationDataModule.original_geometry`:
    ``preprocessed_affine``, ``shape`` and ``affine`` of the original image.
    """
    path = Path(path)
    resampled = to_original_geometry(labels, geometry["preprocessed_affine"], geometry["shape"][-3:], geometry["affine"])
    with atomic_path(path, keep_suffixes=True) as temporary:  # TorchIO picks the format from the name
        resampled.save(temporary)
    return path
