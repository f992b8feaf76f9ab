"""Scaling: train-step time, memory and FLOPs of each method against the ROI and the mask ratio.

The 64³ and 96³ points come from :mod:`benchmarks.methods`; this adds 128³ (not in quick mode)
and a mask-ratio sweep at 64³, each in a fresh process per method (the ratios interleaved in that
process). Sizes are the methods benchmark's (see ``METHODS``).

``python -m benchmarks.scaling experiments/smit.yaml --roi 64 --batch 1`` counts the FLOPs, saved
activations and parameters of one step of any recipe (see ``benchmarks/COST_MODEL.md``).
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import interleaved_timings, run_isolated, table
from benchmarks.methods import (
    MethodSpec,
    available_methods,
    build_method,
    method_overrides,
    method_step,
    profile_method,
    saved_tensor_bytes,
    spec_named,
    stub_trainer,
)


@dataclass(frozen=True)
class ScalingConfig:
    extra_rois: tuple[int, ...] = (128,)
    roi_repeats: int = 1  # large ROIs: one warm-up step, then this many timed (they are long and steady)
    ratio_roi: int = 64
    mask_ratios: tuple[float, ...] = (0.5, 0.75, 0.9)
    ratio_repeats: int = 2

    @staticmethod
    def full() -> ScalingConfig:
        return ScalingConfig()

    @staticmethod
    def quick() -> ScalingConfig:
        return ScalingConfig(extra_rois=(), mask_ratios=(0.5, 0.9), ratio_repeats=1)


def time_at_roi(name: str, roi: int, repeats: int, **overrides: Any) -> dict[str, Any]:
    """Median step time at ``roi`` after one warm-up step, then FLOPs and saved activations (same process)."""
    module, optimizer, batch = build_method(spec_named(name), roi, **overrides)
    timings = interleaved_timings({"step": method_step(module, optimizer, batch)}, warmup=1, repeats=repeats)
    del module, optimizer, batch
    return {"timings": timings, **profile_method(name, roi, steps=0, **overrides)}


def time_mask_ratios(name: str, roi: int, ratios: tuple[float, ...], warmup: int, repeats: int,
                     **overrides: Any) -> dict[str, Any]:
    steps = {}
    for value in ratios:
        module, optimizer, batch = build_method(spec_named(name), roi, **{**overrides, "mask_ratio": value})
        steps[str(value)] = method_step(module, optimizer, batch)
    return {"timings": interleaved_timings(steps, warmup=warmup, repeats=repeats)}


def _try(function, *args, **kwargs) -> dict[str, Any]:
    try:
        return run_isolated(function, *args, **kwargs)
    except Exception as error:  # noqa: BLE001
        return {"error": str(error)[-3000:]}


def run(config: ScalingConfig, methods_section: dict[str, Any] | None, quick: bool = False,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    methods, notes = available_methods()
    runs: dict[str, Any] = {}
    for spec in methods:
        overrides = method_overrides(spec, quick)
        for roi in config.extra_rois:
            log(f"scaling: {spec.name} at {roi}³")
            runs[f"{spec.name}@{roi}"] = _try(time_at_roi, spec.name, roi, config.roi_repeats, **overrides)
        log(f"scaling: {spec.name} mask ratios at {config.ratio_roi}³")
        runs[f"{spec.name}/ratios"] = _try(time_mask_ratios, spec.name, config.ratio_roi, config.mask_ratios, 1,
                                           config.ratio_repeats, **overrides)
    return summarize(runs, methods, methods_section or {}, config, notes)


def _point(methods_section: dict, runs: dict, spec: MethodSpec, roi: int) -> tuple[float | None, ...]:
    """(step s, peak RSS MB, GFLOP, saved activations MB) at ``roi`` from either benchmark."""
    entry = methods_section.get("runs", {}).get(f"{spec.name}@{roi}")
    if entry is not None:
        timing, profile = entry.get("timing", {}), entry.get("profile", {})
    else:
        timing = profile = runs.get(f"{spec.name}@{roi}", {})
    step = timing.get("timings", {}).get("step", {}).get("median_s")
    flops = profile.get("flops")
    return (step, profile.get("process", {}).get("peak_rss_mb"), None if flops is None else flops / 1e9,
            profile.get("activation_mb"))


def summarize(runs: dict, methods: list[MethodSpec], methods_section: dict, config: ScalingConfig,
              notes: list[str]) -> dict[str, Any]:
    method_rois = tuple(methods_section.get("config", {}).get("rois", ()))
    rois = tuple(sorted({*method_rois, *config.extra_rois}))
    roi_rows = []
    for spec in methods:
        for roi in rois:
            step, peak, gflop, activations = _point(methods_section, runs, spec, roi)
            roi_rows.append([spec.name, f"{roi}³", step, peak, gflop, activations])
    ratio_rows = []
    for spec in methods:
        timings = runs.get(f"{spec.name}/ratios", {}).get("timings", {})
        ratio_rows.append([spec.name, *[timings.get(str(r), {}).get("median_s") for r in config.mask_ratios]])
    return {
        "title": "Scaling (step time vs ROI and mask ratio)",
        "config": {"extra_rois": list(config.extra_rois), "ratio_roi": config.ratio_roi,
                   "mask_ratios": list(config.mask_ratios)},
        "runs": runs,
        "tables": [
            table("Step time, peak memory, FLOPs and saved activations vs ROI (batch 2, fp32)",
                  ["method", "ROI", "step s", "peak RSS MB", "GFLOP / step", "saved activations MB"], roi_rows,
                  notes=[f"{', '.join(f'{r}³' for r in method_rois)} from the methods benchmark; the rest from a "
                         "fresh process per method and ROI."]),
            table(f"Step time (s) vs mask ratio at {config.ratio_roi}³",
                  ["method", *[f"ratio {r}" for r in config.mask_ratios]], ratio_rows,
                  notes=["Ratios interleaved in one process per method. Only methods whose encoder drops masked "
                         "tokens (MAE-3D, SelfMedHPM) get cheaper as the ratio grows; the others encode every "
                         "token or voxel whatever the ratio."]),
        ],
        "notes": notes,
    }


def recipe_cost(config: str | Path, roi: int, batch: int) -> dict[str, Any]:
    """Parameters, FLOPs and saved activations of one train step of the model in an experiment YAML."""
    import yaml
    from torch.utils.flop_counter import FlopCounterMode

    settings = yaml.safe_load(Path(config).read_text())
    model = settings["model"]
    module_name, _, class_name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(**{**model.get("init_args", {}), "img_size": roi})
    module._trainer = stub_trainer()
    module.train()
    views = int(settings.get("data", {}).get("init_args", {}).get("num_views", 1))
    images = torch.rand(batch, views, 1, roi, roi, roi)
    inputs = {"image": images[:, 0], "case_id": [str(i) for i in range(batch)]}
    if views > 1:
        inputs["views"] = images
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    counter = FlopCounterMode(display=False)
    with counter:
        out, activation_bytes = saved_tensor_bytes(lambda: module.shared_step(inputs), parameters)
        out.losses["loss"].backward()
    return {"config": str(config), "roi": roi, "batch": batch, "gflop": counter.get_total_flops() / 1e9,
            "activation_mb": activation_bytes / 2**20,
            "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "frozen_parameters": sum(p.numel() for p in module.parameters() if not p.requires_grad)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLOPs, saved activations and parameters of one recipe train step")
    parser.add_argument("configs", nargs="+", help="experiment YAML files (model and data sections are read)")
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    for config in args.configs:
        print(json.dumps(recipe_cost(config, args.roi, args.batch)), flush=True)


if __name__ == "__main__":
    main()
