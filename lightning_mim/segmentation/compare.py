"""``python -m lightning_mim compare RUN_OR_CSV ... --output DIR``: one table and one plot from many runs.

Sources are test CSVs (``test_metrics.csv``, written by ``SegmentationModule`` at ``test``), run
folders holding one (searched recursively), or W&B run folders: the module saves the CSV into the
W&B run (``files/test_metrics.csv``, offline runs included), and an online run's
``files/wandb-summary.json`` (``test/dice/<organ>``, ``test/method``, ``test/label_fraction``) is
used when a folder has no CSV. (Offline runs keep their summary only inside the binary
``run-*.wandb`` log, which is not read.) Every source becomes per-run organ means; runs with the
same data set, method and label fraction (e.g. several seeds) are averaged, their spread reported
across runs (or across cases for a single run). Runs of different data sets are never merged: the
data set comes from the CSV's ``dataset`` column, else from the data section of the run's
``lightning_config.yaml`` beside it. Runs to be averaged must evaluate the same organs, else the
comparison stops and names them.

Writes ``comparison.csv`` (data set × method × label fraction × organ), ``comparison.md`` (per
data set and label fraction, organs × methods side by side) and ``dice_vs_label_fraction.png``;
``--wandb true`` also logs them to a W&B run (offline unless ``--wandb_offline false``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_mim.segmentation.evaluation import METRIC_NOTE, read_metrics_csv
from lightning_mim.segmentation.module import TEST_CSV

MEAN_ROW = "mean"
UNKNOWN_DATASET = "unknown data set"


def dataset_from_run_config(csv_path: Path) -> str | None:
    """The data set of the run that wrote ``csv_path``, from ``lightning_config.yaml`` beside it."""
    import yaml

    from data_modules.segmentation import dataset_name

    config_path = csv_path.parent / "lightning_config.yaml"
    if not config_path.is_file():
        return None
    data = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
    arguments = data.get("init_args") if isinstance(data, dict) else None
    return dataset_name(**arguments) if isinstance(arguments, dict) else None


@dataclass
class RunResult:
    """One run's per-organ mean Dice (and per-case values when known)."""

    source: str
    method: str
    label_fraction: float | None
    num_labelled: int | None
    organ_dice: dict[str, float]
    case_dice: dict[str, list[float]] = field(default_factory=dict)
    organ_order: list[str] = field(default_factory=list)
    dataset: str = UNKNOWN_DATASET


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def run_from_csv(path: Path) -> list[RunResult]:
    """Per (method, label fraction) group of one metrics CSV (normally exactly one)."""
    rows = read_metrics_csv(path)
    from_config = None if all(row["dataset"] for row in rows) else dataset_from_run_config(path)
    groups: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"] or from_config or UNKNOWN_DATASET, row["method"], row["label_fraction"]),
                          []).append(row)
    runs = []
    for (dataset, method, fraction), items in groups.items():
        order = [r["organ"] for r in sorted({(r["class_index"], r["organ"]): r for r in items}.values(),
                                            key=lambda r: r["class_index"])]
        cases = {organ: _finite(r["dice"] for r in items if r["organ"] == organ) for organ in order}
        runs.append(RunResult(str(path), method, fraction, items[0]["num_labelled"],
                              {o: float(np.mean(v)) if v else math.nan for o, v in cases.items()}, cases, order,
                              dataset))
    return runs


def run_from_wandb_summary(path: Path) -> RunResult | None:
    """A W&B run folder's summary, when it holds test results (``test/dice/<organ>``)."""
    summary = json.loads(path.read_text())
    organs = {k[len("test/dice/"):]: float(v) for k, v in summary.items()
              if k.startswith("test/dice/") and isinstance(v, (int, float))}
    if not organs:
        return None
    fraction = summary.get("test/label_fraction")
    labelled = summary.get("test/num_labelled")
    return RunResult(str(path), str(summary.get("test/method", "unknown")), None if fraction is None else float(fraction),
                     None if labelled is None else int(labelled), organs, {}, list(organs),
                     str(summary.get("test/dataset") or UNKNOWN_DATASET))


def collect_runs(sources: Sequence[str | os.PathLike]) -> list[RunResult]:
    """Runs found in CSV files and folders (test CSVs first; W&B summaries where a folder has none)."""
    runs: list[RunResult] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            runs += run_from_csv(path) if path.suffix == ".csv" else [r for r in [run_from_wandb_summary(path)] if r]
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or folder")
        # A run's CSV also sits in its W&B folder (files/, a link for offline runs): count each file once.
        found = sorted({p.resolve(): p for p in path.rglob(TEST_CSV)}.values())
        for csv_path in found:
            runs += run_from_csv(csv_path)
        if not found:
            for summary in sorted(path.rglob("wandb-summary.json")):
                run = run_from_wandb_summary(summary)
                if run is not None:
                    runs.append(run)
        if not any(r.source.startswith(str(path)) for r in runs):
            raise ValueError(f"{path}: no {TEST_CSV} and no W&B summary with test results below it")
    return runs


def _same_organs(group: Sequence[RunResult]) -> list[str]:
    """The organs every run of ``group`` evaluates; runs of different label sets are never averaged."""
    organ_sets = {run.source: list(run.organ_order or run.organ_dice) for run in group}
    if len({tuple(sorted(organs)) for organs in organ_sets.values()}) > 1:
        first = group[0]
        raise ValueError(
            f"refusing to average runs of {first.dataset!r}, method {first.method!r}, label fraction "
            f"{first.label_fraction} whose organs differ: "
            + "; ".join(f"{source}: {', '.join(organs)}" for source, organs in organ_sets.items())
            + ". Compare runs of one label set at a time."
        )
    return next(iter(organ_sets.values()))


def comparison_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Long table: one row per data set × method × label fraction × organ, plus the organ-mean row (``organ = mean``)."""
    groups: dict[tuple[str, str, float | None], list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.method, run.label_fraction), []).append(run)
    rows = []
    for (dataset, method, fraction), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0.0)):
        organs = _same_organs(group)
        labelled = sorted({r.num_labelled for r in group if r.num_labelled is not None})
        for organ in organs:
            run_means = _finite(r.organ_dice.get(organ) for r in group)
            cases = [v for r in group for v in r.case_dice.get(organ, [])]
            spread = float(np.std(run_means)) if len(run_means) > 1 else (float(np.std(cases)) if cases else math.nan)
            rows.append({"dataset": dataset, "method": method, "label_fraction": fraction, "num_labelled": labelled[0] if len(labelled) == 1 else None,
                         "organ": organ, "dice_mean": float(np.mean(run_means)) if run_means else math.nan,
                         "dice_std": spread, "runs": len(group), "cases": len(cases) or None})
        per_run = [np.mean(_finite(r.organ_dice.values())) for r in group if _finite(r.organ_dice.values())]
        rows.append({"dataset": dataset, "method": method, "label_fraction": fraction, "num_labelled": labelled[0] if len(labelled) == 1 else None,
                     "organ": MEAN_ROW, "dice_mean": float(np.mean(per_run)) if per_run else math.nan,
                     "dice_std": float(np.std(per_run)) if len(per_run) > 1 else math.nan, "runs": len(group), "cases": None})
    return rows


def _fmt(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.4f}"


def comparison_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Per data set and label fraction: organs down, methods across (mean Dice, ± spread)."""
    lines = ["# Method comparison", "", METRIC_NOTE, "± = std across runs (several runs) or across test cases (one run).", ""]
    sections = sorted({(r["dataset"], r["label_fraction"]) for r in rows}, key=lambda s: (s[0], s[1] is None, s[1] or 0.0))
    for dataset, fraction in sections:
        part = [r for r in rows if (r["dataset"], r["label_fraction"]) == (dataset, fraction)]
        methods = list(dict.fromkeys(r["method"] for r in part))
        organs = list(dict.fromkeys(r["organ"] for r in part if r["organ"] != MEAN_ROW)) + [MEAN_ROW]
        labelled = sorted({r["num_labelled"] for r in part if r["num_labelled"] is not None})
        note = f" ({', '.join(map(str, labelled))} labelled case(s))" if labelled else ""
        lines += [f"## {dataset}: label fraction {fraction}{note}", "", "| organ | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        cell = {(r["method"], r["organ"]): r for r in part}
        for organ in organs:
            values = []
            for method in methods:
                row = cell.get((method, organ))
                if row is None:
                    values.append("—")
                else:
                    spread = "" if math.isnan(row["dice_std"]) else f" ± {row['dice_std']:.3f}"
                    values.append(f"{_fmt(row['dice_mean'])}{spread}")
            name = f"**{organ} Dice**" if organ == MEAN_ROW else organ
            lines.append(f"| {name} | " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_dice_vs_fraction(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean Dice against label fraction, one line per method (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    means = [r for r in rows if r["organ"] == MEAN_ROW and r["label_fraction"] is not None]
    several = len({r["dataset"] for r in means}) > 1
    for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in means):
        points = sorted((r["label_fraction"], r["dice_mean"], r["dice_std"]) for r in means
                        if (r["dataset"], r["method"]) == (dataset, method))
        x, y, e = (np.array(v, dtype=float) for v in zip(*points))
        axis.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3,
                      label=f"{method} ({dataset})" if several else method)
    axis.set_xlabel("label fraction (share of labelled training cases)")
    axis.set_ylabel("mean Dice (foreground organs)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def write_table_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = ["dataset", "method", "label_fraction", "num_labelled", "organ", "dice_mean", "dice_std", "runs", "cases"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return path


def log_to_wandb(rows: Sequence[dict[str, Any]], plot: Path, output: Path, project: str, offline: bool) -> str:
    import wandb

    run = wandb.init(project=project, job_type="compare", dir=str(output), mode="offline" if offline else "online")
    columns = ["dataset", "method", "label_fraction", "num_labelled", "organ", "dice_mean", "dice_std", "runs"]
    run.log({"comparison/table": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows]),
             "comparison/dice_vs_label_fraction": wandb.Image(str(plot))})
    run.finish()
    return run.dir


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    markdown: str
    csv: Path
    markdown_path: Path
    plot: Path


def compare(sources: Sequence[str | os.PathLike], output: str | os.PathLike, wandb: bool = False,
            wandb_project: str = "lightning-mim", wandb_offline: bool = True) -> Comparison:
    """Gather the runs, write the table, Markdown and plot into ``output``."""
    runs = collect_runs(sources)
    if not runs:
        raise ValueError("no results found in the given sources")
    rows = comparison_table(runs)
    folder = Path(output).expanduser()
    markdown = comparison_markdown(rows)
    folder.mkdir(parents=True, exist_ok=True)
    markdown_path = folder / "comparison.md"
    markdown_path.write_text(markdown)
    result = Comparison(rows, markdown, write_table_csv(rows, folder / "comparison.csv"), markdown_path,
                        plot_dice_vs_fraction(rows, folder / "dice_vs_label_fraction.png"))
    if wandb:
        log_to_wandb(rows, result.plot, folder, wandb_project, wandb_offline)
    return result


def main(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m lightning_mim compare",
                            description="Gather test results of several runs into one table and a Dice-vs-label-fraction plot.")
    parser.add_argument("sources", type=str, nargs="+",
                        help="test_metrics.csv files, run folders, or W&B run folders (offline-run-*)")
    parser.add_argument("--output", type=str, required=True, help="folder for comparison.{csv,md} and the plot")
    parser.add_argument("--wandb", type=bool, default=False, help="also log the table and plot to W&B")
    parser.add_argument("--wandb_project", type=str, default="lightning-mim", help="W&B project of that run")
    parser.add_argument("--wandb_offline", type=bool, default=True, help="keep the W&B run offline")
    args = parser.parse_args(argv)
    try:
        result = compare(args.sources, args.output, args.wandb, args.wandb_project, args.wandb_offline)
    except (ValueError, FileNotFoundError) as error:  # sources without results, runs that cannot be averaged
        print(f"compare: {error}", file=sys.stderr)
        return 1
    print(result.markdown)
    print(f"written: {result.csv}, {result.markdown_path}, {result.plot}")
    return 0
