"""The study's tables and plot from its arm results.

Cells: method × evaluation (probe, fine-tuning at each budget) × organ. For each arm (one seed) the
per-organ metric is averaged over the test cases; a cell shows mean ± SD of those per-seed values,
for the pre-trained arm and for scratch (the same network, budget and seeds). The difference
column is the paired difference pre-trained − scratch over (seed, test case) pairs with its 95 % CI
(:func:`~lightning_mim.study.statistics.paired_bootstrap_ci`). ``mean`` is the mean over organs,
computed per case before the statistics.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_mim.study.statistics import CI_METHOD, mean_sd, paired_bootstrap_ci

METRICS = ("dice", "nsd", "hd95")
MEAN = "mean"


def _matrix(arms: Sequence[dict[str, Any]], seeds: Sequence[int], cases: Sequence[str], organ: str, metric: str) -> np.ndarray:
    """``seeds × cases`` values of one metric (organ ``mean``: mean over organs per case); NaN where missing."""
    out = np.full((len(seeds), len(cases)), np.nan)
    for arm in arms:
        if arm["seed"] not in seeds:
            continue
        values: dict[str, list[float]] = {}
        for row in arm["rows"]:
            if organ == MEAN or row["organ"] == organ:
                value = row[metric]
                if value is not None and math.isfinite(value):
                    values.setdefault(row["case_id"], []).append(value)
        for case, items in values.items():
            out[list(seeds).index(arm["seed"]), list(cases).index(case)] = float(np.mean(items))
    return out


def _seed_means(matrix: np.ndarray) -> list[float]:
    return [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in matrix]


def build_table(results: Sequence[dict[str, Any]], seeds: Sequence[int], bootstrap_seed: int = 0) -> list[dict[str, Any]]:
    """One row per method × evaluation × organ with mean/SD per arm and the paired difference (Dice, NSD, HD95)."""
    evaluations = sorted({(r["kind"], r["budget"] or 0) for r in results}, key=lambda e: (e[0] != "probe", e[1]))
    methods = list(dict.fromkeys(r["for_method"] for r in results if r["method"] != "scratch"))
    organs = list(dict.fromkeys(row["organ"] for r in results for row in r["rows"])) + [MEAN]
    cases = sorted({row["case_id"] for r in results for row in r["rows"]})
    table = []
    for method in methods:
        for kind, budget in evaluations:
            arms = [r for r in results if r["for_method"] == method and r["kind"] == kind and (r["budget"] or 0) == budget]
            pre = [r for r in arms if r["method"] != "scratch"]
            scratch = [r for r in arms if r["method"] == "scratch"]
            if not pre or not scratch:
                continue
            paired = sorted({r["seed"] for r in pre} & {r["seed"] for r in scratch})
            for organ in organs:
                row: dict[str, Any] = {"method": method, "network": pre[0]["network"], "evaluation": kind,
                                       "labelled_cases": budget or None, "organ": organ, "seeds": len(paired)}
                for metric in METRICS:
                    a, b = _matrix(pre, paired, cases, organ, metric), _matrix(scratch, paired, cases, organ, metric)
                    row[f"{metric}_pretrained_mean"], row[f"{metric}_pretrained_sd"] = mean_sd(_seed_means(a))
                    row[f"{metric}_scratch_mean"], row[f"{metric}_scratch_sd"] = mean_sd(_seed_means(b))
                    difference, low, high = paired_bootstrap_ci(a - b, seed=bootstrap_seed)
                    row[f"{metric}_difference"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = difference, low, high
                table.append(row)
    return table


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _difference(row: dict[str, Any], metric: str, digits: int = 3) -> str:
    d, low, high = row[f"{metric}_difference"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if not math.isfinite(d):
        return "n/a"
    mark = " **✓**" if low > 0 else (" ✗" if high < 0 else "")
    return f"{d:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"


def _evaluation_name(row: dict[str, Any]) -> str:
    cases = f"{row['labelled_cases']} labelled" if row["labelled_cases"] else "all labelled"
    return f"frozen probe ({cases})" if row["evaluation"] == "probe" else f"fine-tune, {cases}"


def summary_markdown(table: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """Headline (mean over organs per method × evaluation) then per-organ Dice tables."""
    lines = [f"# Label-efficiency study: {header.get('name', 'study')}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "name"]
    lines += ["", f"Cells: mean ± SD over seeds of the per-seed mean over test cases. Difference: pre-trained − scratch "
              f"(same network, budget, seeds), {CI_METHOD}. **✓**: CI above 0; ✗: CI below 0. NSD at "
              f"{header.get('nsd_tolerance_mm')} mm; HD95 in mm (lower is better).", "",
              "## Mean over organs", "",
              "| method | network | evaluation | seeds | Dice pre-trained | Dice scratch | Dice difference [95 % CI] | "
              "NSD difference [95 % CI] | HD95 pre-trained | HD95 scratch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in (r for r in table if r["organ"] == MEAN):
        lines.append(f"| {row['method']} | {row['network']} | {_evaluation_name(row)} | {row['seeds']} | "
                     f"{_fmt(row['dice_pretrained_mean'])} ± {_fmt(row['dice_pretrained_sd'])} | "
                     f"{_fmt(row['dice_scratch_mean'])} ± {_fmt(row['dice_scratch_sd'])} | {_difference(row, 'dice')} | "
                     f"{_difference(row, 'nsd')} | {_fmt(row['hd95_pretrained_mean'], 1)} | {_fmt(row['hd95_scratch_mean'], 1)} |")
    lines += ["", "## Dice per organ (pre-trained / scratch, mean ± SD; difference [95 % CI])", ""]
    for method in dict.fromkeys(r["method"] for r in table):
        lines += [f"### {method}", "", "| evaluation | organ | pre-trained | scratch | difference [95 % CI] |",
                  "|---|---|---|---|---|"]
        for row in (r for r in table if r["method"] == method and r["organ"] != MEAN):
            lines.append(f"| {_evaluation_name(row)} | {row['organ']} | {_fmt(row['dice_pretrained_mean'])} ± "
                         f"{_fmt(row['dice_pretrained_sd'])} | {_fmt(row['dice_scratch_mean'])} ± "
                         f"{_fmt(row['dice_scratch_sd'])} | {_difference(row, 'dice')} |")
        lines.append("")
    return "\n".join(lines)


def plot_label_efficiency(table: Sequence[dict[str, Any]], path: Path) -> Path:
    """Mean Dice vs labelled cases: one line per method (pre-trained), one dashed line per scratch network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["organ"] == MEAN and r["evaluation"] == "finetune"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    scratch_done: dict[tuple, str] = {}  # scratch curve → its label; one network name may be built two ways (SMIT's Swin)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["labelled_cases"] or 0)
        x = [r["labelled_cases"] for r in points]
        axis.errorbar(x, [r["dice_pretrained_mean"] for r in points], yerr=[r["dice_pretrained_sd"] for r in points],
                      marker="o", capsize=3, label=method)
        network = points[0]["network"]
        curve = (network, *x, *(r["dice_scratch_mean"] for r in points))
        if curve not in scratch_done:
            named = network not in {key[0] for key in scratch_done}
            scratch_done[curve] = f"scratch ({network})" if named else f"scratch ({network} as {method} builds it)"
            axis.errorbar(x, [r["dice_scratch_mean"] for r in points], yerr=[r["dice_scratch_sd"] for r in points],
                          marker="s", capsize=3, linestyle="--", color="grey", alpha=0.4 + 0.6 / len(scratch_done),
                          label=scratch_done[curve])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("labelled training cases")
    axis.set_ylabel("mean Dice over organs (± SD over seeds)")
    axis.set_title("Label efficiency: pre-trained vs scratch")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(table: Sequence[dict[str, Any]], header: dict[str, Any], folder: Path, stem: str = "study") -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>.json`` and ``<stem>_label_efficiency.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / f"{stem}.md", "csv": folder / f"{stem}.csv", "json": folder / f"{stem}.json",
             "plot": folder / f"{stem}_label_efficiency.png"}
    paths["markdown"].write_text(summary_markdown(table, header))
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["method"])
        writer.writeheader()
        for row in table:
            writer.writerow({k: "" if _clean(v) is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    paths["json"].write_text(json.dumps({"header": header, "ci_method": CI_METHOD,
                                         "rows": [{k: _clean(v) for k, v in r.items()} for r in table]}, indent=1))
    plot_label_efficiency(table, paths["plot"])
    return paths
