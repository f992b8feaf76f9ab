"""Online segmentation probe: what one probe costs next to the pre-training steps it interrupts.

The pre-training run is the earlier demo's (``benchmarks/configs/probe_pretrain_mae.yaml``: MAE-3D, ViT 48 × 12
blocks on 48³ crops, batch 8, the phantom cohort), built from its YAML. A *step* is what Lightning's
automatic optimisation runs for it: ``shared_step``, ``backward``, an AdamW step, on batches loaded
beforehand (data loading is left out, so the share below is an upper bound). A
*probe* is :meth:`lightning_mim.callbacks.probe.SegmentationProbe.probe` with the callback's
defaults: export the encoder, load it into UNETR, encode 2 + 2 cases × 4 crops, fit the linear head
(100 full-batch Adam steps), Dice on the eval crops. Steps and probes are timed interleaved in one
process after a warm-up; the one-off set-up (labelled cohort, cache, network, crops) is reported
apart.

Cost share at ``every_n_steps = N``: ``probe / (N · step + probe)``, the fraction of pre-training
wall time spent probing.
"""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import yaml

from benchmarks.common import interleaved_timings, ratio, run_isolated, table, target

REPO = Path(__file__).resolve().parent.parent
COST_TARGET = 0.10  # share of pre-training wall time at the default every_n_steps
PREFETCHED_BATCHES = 4  # steps are timed on loaded batches: loading is left out, which can only raise the share


@dataclass(frozen=True)
class ProbeBenchConfig:
    recipe: str = "benchmarks/configs/probe_pretrain_mae.yaml"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_overrides: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)  # SegmentationProbe arguments (defaults when empty)
    every_n_steps: tuple[int, ...] = (100, 250, 500, 1000)
    warmup: int = 1
    repeats: int = 3
    steps_per_repeat: int = 5

    @staticmethod
    def full() -> ProbeBenchConfig:
        return ProbeBenchConfig()

    @staticmethod
    def quick() -> ProbeBenchConfig:
        return ProbeBenchConfig(
            model_overrides={"img_size": 32, "embed_dim": 24, "num_heads": 2, "decoder_dim": 24, "decoder_depth": 1, "decoder_heads": 2},
            data_overrides={"patch_size": 32, "batch_size": 2, "phantom_cases": 4, "phantom_shape": [64, 64, 32]},
            probe={"crops_per_case": 2, "head_steps": 10, "data": {"phantom_cases": 4}}, warmup=0, repeats=1,
            steps_per_repeat=1)


def build_run(config: ProbeBenchConfig, root: Path):
    """(method, its AdamW, an endless cycle over a few loaded batches, the pre-training data module) of the recipe."""
    from lightning_mim.reliability.check_data import data_module_from_args

    recipe = yaml.safe_load((REPO / config.recipe).read_text())
    model = recipe["model"]
    module_name, _, class_name = model["class_path"].rpartition(".")
    data_args = ["--config", str(REPO / config.recipe), "--data.init_args.phantom_root", str(root / "phantoms"),
                 "--data.init_args.cache_dir", str(root / "cache")]
    for key, value in config.data_overrides.items():
        data_args += [f"--data.init_args.{key}", yaml.safe_dump(value, default_flow_style=True).strip()]
    datamodule = data_module_from_args(data_args)
    datamodule.prepare_data()
    datamodule.setup()
    torch.manual_seed(0)
    method = getattr(importlib.import_module(module_name), class_name)(**{**model["init_args"], **config.model_overrides})
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-4, fused=True)

    loaded = []
    for batch in datamodule.train_dataloader():
        loaded.append(batch)
        if len(loaded) == PREFETCHED_BATCHES:
            break
    return method, optimizer, itertools.cycle(loaded), datamodule


def measure(config: ProbeBenchConfig, root: str) -> dict[str, Any]:
    from lightning_mim.callbacks.probe import SegmentationProbe

    method, optimizer, batches, datamodule = build_run(config, Path(root))
    method.train()

    def steps() -> None:
        for _ in range(config.steps_per_repeat):
            loss = method.shared_step(next(batches)).losses["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    probe = SegmentationProbe(**config.probe)
    start = time.perf_counter()
    probe.setup_probe(SimpleNamespace(datamodule=datamodule), method)
    setup_s = time.perf_counter() - start
    results: list[dict[str, float]] = []

    def one_probe() -> None:
        results.append(probe.probe(method))

    timings = interleaved_timings({"steps": steps, "probe": one_probe}, warmup=config.warmup, repeats=config.repeats)
    return {"timings": timings, "setup_s": setup_s, "step_s": timings["steps"]["median_s"] / config.steps_per_repeat,
            "probe_s": timings["probe"]["median_s"], "crops": {k: len(v[0]) for k, v in probe._crops.items()},
            "defaults": {k: getattr(probe, k) for k in ("every_n_steps", "fit_cases", "eval_cases", "crops_per_case",
                                                       "feature_stride", "head_hidden", "head_steps")},
            "last_dice_mean": results[-1]["probe/dice_mean"] if results else None}


def run(config: ProbeBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from benchmarks.data_path import bench_root

    log("probe: pre-training steps vs one online segmentation probe")
    root = bench_root() / "probe"
    try:
        measured = run_isolated(measure, config, str(root))
    except Exception as error:  # noqa: BLE001
        measured = {"error": str(error)[-3000:]}
    return summarize(measured, config)


def cost_share(probe_s: float, step_s: float, every_n_steps: int) -> float:
    """Share of wall time spent probing when a probe follows every ``every_n_steps`` steps."""
    return probe_s / (every_n_steps * step_s + probe_s)


def summarize(measured: dict[str, Any], config: ProbeBenchConfig) -> dict[str, Any]:
    if measured.get("error"):
        return {"title": "Online segmentation probe", "config": asdict(config), "measured": measured, "tables": [],
                "targets": [target("probe: share of pre-training time at the default every_n_steps", None,
                                   f"≤ {COST_TARGET:.0%}", None)],
                "notes": [f"measurement failed: {measured['error'].strip().splitlines()[-1]} (traceback in the JSON)"]}
    step_s, probe_s = measured["step_s"], measured["probe_s"]
    default_every = measured["defaults"]["every_n_steps"]
    rows = [[n, n * step_s, probe_s, cost_share(probe_s, step_s, n)] for n in sorted({*config.every_n_steps, default_every})]
    share = cost_share(probe_s, step_s, default_every)
    return {
        "title": "Online segmentation probe",
        "config": asdict(config),
        "measured": measured,
        "tables": [
            table(f"Probe cost next to pre-training ({config.recipe}; probe {measured['defaults']}, "
                  f"crops {measured['crops']})",
                  ["every_n_steps", "steps between probes s", "probe s", "share of wall time"], rows,
                  notes=[(f"Median step {step_s:.3f} s, median probe {probe_s:.2f} s (interleaved, after a warm-up); "
                          f"one-off set-up {measured['setup_s']:.1f} s (cohort, cache, network, crops), "
                          f"probe/step = {ratio(probe_s, step_s):.0f}.")]),
        ],
        "targets": [target(f"probe: share of pre-training time at every_n_steps={default_every}", share,
                           f"≤ {COST_TARGET:.0%}", share <= COST_TARGET)],
        "notes": [],
    }
