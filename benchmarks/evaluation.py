"""Evaluation: our sliding-window validation path next to MONAI's ``sliding_window_inference``.

Both sides run the same network (a small UNETR: the project's ViT fine-tuning target) on the same
volume, in eval mode under ``torch.inference_mode`` as Lightning's validation loop does, with the
same settings (96³ ROI, overlap 0.5, Gaussian blending, sw batch 1) and end with the class map.
Ours is :meth:`lightning_mim.segmentation.module.SegmentationModule.predict_volume`.

Timing uses a 160 × 160 × 128 volume (18 windows); peak memory is measured on a full-size CT
(a synthetic 512 × 512 × 160 CT preprocessed to 1.5 × 1.5 × 2 mm) in fresh processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.common import interleaved_timings, ratio, run_isolated, table, target

NUM_CLASSES = 9
SW_OVERLAP = 0.5


@dataclass(frozen=True)
class EvalBenchConfig:
    roi: int = 96
    timing_volume: tuple[int, int, int] = (160, 160, 128)
    network: str = "unetr"
    network_kwargs: dict[str, Any] = field(
        default_factory=lambda: dict(hidden_size=96, mlp_dim=384, num_heads=4, feature_size=8))
    full_ct: bool = True  # peak memory on the preprocessed full-size synthetic CT
    warmup: int = 1
    repeats: int = 2

    @staticmethod
    def full() -> EvalBenchConfig:
        return EvalBenchConfig()

    @staticmethod
    def quick() -> EvalBenchConfig:
        return EvalBenchConfig(roi=32, timing_volume=(64, 64, 48), network_kwargs=dict(
            hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8), full_ct=False, repeats=2)


def build_module(config: EvalBenchConfig):
    from lightning_mim.segmentation.module import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(num_classes=NUM_CLASSES, network=config.network, network_kwargs=dict(config.network_kwargs),
                                roi_size=config.roi, sw_overlap=SW_OVERLAP)
    return module.eval()


def predictors(module, config: EvalBenchConfig) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from monai.inferers import sliding_window_inference

    def monai(image: torch.Tensor) -> torch.Tensor:
        logits = sliding_window_inference(image, (config.roi,) * 3, module.sw_batch_size, module.network,
                                          overlap=module.sw_overlap, mode=module.sw_mode,
                                          sigma_scale=module.sw_sigma_scale)
        return logits.argmax(dim=1)

    return {"ours": module.predict_volume, "monai": monai}


def time_sliding_window(config: EvalBenchConfig) -> dict[str, Any]:
    module = build_module(config)
    image = torch.rand(1, 1, *config.timing_volume)
    sides = predictors(module, config)
    with torch.inference_mode():
        agree = bool(torch.equal(sides["ours"](image), sides["monai"](image)))
        timings = interleaved_timings({name: (lambda f=f: f(image)) for name, f in sides.items()},
                                      warmup=config.warmup, repeats=config.repeats)
    return {"timings": timings, "same_prediction": agree, "volume": list(config.timing_volume)}


def full_ct_shape() -> tuple[int, int, int]:
    """Spatial shape of a 512 × 512 × 160 synthetic CT after the benchmark preprocessing (cached on disk)."""
    from benchmarks.data_path import PREPROCESSING, bench_root, ensure_synthetic_cts
    from data_modules.cache import ensure_cached
    from data_modules.presets import Preprocessing
    from data_modules.sources import Case

    path = ensure_synthetic_cts(1, (512, 512, 160), (0.7, 0.7, 2.5))[0]
    volume = ensure_cached([Case("ct_000", path, None)], Preprocessing(**PREPROCESSING), bench_root() / "eval-cache")[0]
    return tuple(volume.shape[1:])


def sliding_window_memory(config: EvalBenchConfig, side: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Run one side once on a ``shape`` volume; the parent reads the peak RSS. Returns the RSS before it."""
    import psutil

    module = build_module(config)
    image = torch.rand(1, 1, *shape)
    before = psutil.Process().memory_info().rss / 2**20
    with torch.inference_mode():
        predictors(module, config)[side](image)
    return {"rss_before_mb": before, "shape": list(shape)}


def _try(function, *args, **kwargs) -> dict[str, Any]:
    try:
        return run_isolated(function, *args, **kwargs)
    except Exception as error:  # noqa: BLE001
        return {"error": str(error)[-3000:]}


def run(config: EvalBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    log("evaluation: sliding window, ours vs MONAI")
    timing = _try(time_sliding_window, config)
    memory = {}
    if config.full_ct:
        try:
            shape = full_ct_shape()
        except Exception as error:  # noqa: BLE001
            memory["error"] = str(error)
        else:
            for side in ("ours", "monai"):
                log(f"evaluation: peak memory on a full-size CT {shape}, {side}")
                memory[side] = _try(sliding_window_memory, config, side, shape)
    return summarize(timing, memory, config)


def summarize(timing: dict, memory: dict, config: EvalBenchConfig) -> dict[str, Any]:
    medians = {k: v["median_s"] for k, v in timing.get("timings", {}).items()}
    value = ratio(medians.get("ours"), medians.get("monai"))
    rows = [[f"{'×'.join(map(str, config.timing_volume))}", medians.get("ours"), medians.get("monai"), value,
             timing.get("same_prediction")]]
    memory_rows = []
    for side in ("ours", "monai"):
        run_result = memory.get(side)
        if run_result and "process" in run_result:
            peak = run_result["process"]["peak_rss_mb"]
            memory_rows.append([side, "×".join(map(str, run_result["shape"])), peak, peak - run_result["rss_before_mb"]])
    network = f"{config.network} {config.network_kwargs}"
    failures = [f"{name} failed: {result['error'].strip().splitlines()[-1]} (traceback in the JSON)"
                for name, result in [("timing", timing), *memory.items()]
                if isinstance(result, dict) and result.get("error")]
    if isinstance(memory.get("error"), str):  # the full-size CT could not be prepared: no side ran
        failures.append(f"full-size CT preparation failed: {memory['error']}")
    return {
        "title": "Evaluation (sliding-window inference)",
        "config": asdict(config),
        "timing": timing,
        "memory": memory,
        "tables": [
            table(f"Sliding window, {config.roi}³ ROI, overlap {SW_OVERLAP}, Gaussian, network {network}",
                  ["volume", "ours s", "MONAI s", "ours / MONAI", "same class map"], rows,
                  notes=["Median of interleaved passes after a warm-up; inference mode, eval mode."]),
            table("Peak memory on a full-size CT (fresh process per side)",
                  ["side", "volume", "peak RSS MB", "added by the pass MB"], memory_rows),
        ],
        "targets": [target("evaluation: ours / MONAI sliding_window_inference", value, "≤ 1.0 (within noise)",
                           None if value is None else value <= 1.05)],
        "notes": failures,
    }
