"""Smoke test of the benchmark code on tiny inputs: correctness of every code path, never timings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks import common, data_path, evaluation, methods, scaling

pytestmark = pytest.mark.timeout(300)


def _fail() -> None:
    raise ValueError("boom")


def _allocate(megabytes: int) -> dict:
    block = np.ones(megabytes * 2**20 // 8)
    return {"sum": float(block.sum())}


def test_isolated_run_reports_the_result_and_its_own_peak_memory():
    out = common.run_isolated(_allocate, 200, threads=1)
    assert out["sum"] == 200 * 2**20 // 8
    assert out["process"]["peak_rss_mb"] - out["process"]["start_rss_mb"] > 150


def test_isolated_run_raises_with_the_child_traceback():
    with pytest.raises(common.IsolatedRunError, match="ValueError: boom"):
        common.run_isolated(_fail, threads=1)


def test_interleaved_timings_call_every_step_warmup_plus_repeats_times():
    calls = {"a": 0, "b": 0}

    def step(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    timings = common.interleaved_timings({"a": step("a"), "b": step("b")}, warmup=2, repeats=3)
    assert calls == {"a": 5, "b": 5}
    assert len(timings["a"]["samples_s"]) == 3 and timings["a"]["min_s"] <= timings["a"]["median_s"]


MEMORY_GROWTH_CHECK = """
import numpy as np
from benchmarks import common
with common.MemorySampler(interval=0.01) as memory:
    block = np.ones(100 * 2**20 // 8)
    block += 1
    memory._sample()
assert memory.peak_private - memory.start_private > 80 * 2**20, (memory.start_private, memory.peak_private)
"""


def test_memory_sampler_sees_private_memory_grow():
    """In a fresh process: the sampler reads the whole process tree, so in the test process a worker that earlier
    tests left behind could exit mid-check and hide the growth (seen once in three targeted runs)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", MEMORY_GROWTH_CHECK], cwd=root, check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(root)})


def test_results_are_written_as_json_and_a_markdown_report(tmp_path):
    section = {"title": "Demo", "tables": [common.table("t", ["a", "b"], [["x", 1.23456], ["y", None]])],
               "targets": [common.target("demo ratio", 0.5, "≤ 1", True)], "notes": ["a note"]}
    results = {"machine": common.machine_info(), "mode": "quick", "duration_s": 1.0, "load_average_end": [0, 0, 0],
               "warning": "busy", "sections": {"demo": section}}
    json_path, md_path = common.write_results(results, tmp_path, "x")
    assert json.loads(json_path.read_text())["sections"]["demo"]["title"] == "Demo"
    text = md_path.read_text()
    for expected in ("torch", "| demo ratio | 0.500 | ≤ 1 | yes |", "| x | 1.23 |", "| y | — |", "**busy**", "a note"):
        assert expected in text


def test_synthetic_ct_is_int16_hu_in_lps_storage(tmp_path):
    import nibabel as nib

    path = data_path.ensure_synthetic_cts(1, (32, 32, 16), (2.0, 2.0, 5.0), root=tmp_path)[0]
    image = nib.load(path)
    assert image.shape == (32, 32, 16) and image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    values = np.asarray(image.dataobj)
    assert values.min() < -500 and values.max() > 0  # air and tissue
    assert data_path.ensure_synthetic_cts(1, (32, 32, 16), (2.0, 2.0, 5.0), root=tmp_path)[0] == path  # reused


def test_every_data_pipeline_delivers_preprocessed_patches(tmp_path):
    paths = data_path.ensure_synthetic_cts(2, (48, 48, 20), (2.0, 2.0, 5.0), root=tmp_path)
    csv_path = str(data_path.write_csv(paths, tmp_path / "cts.csv"))
    cache = str(tmp_path / "cache")
    limits = dict(min_patches=4, min_seconds=0.0, max_seconds=20.0)
    runs = {
        "ct1/ours": data_path.measure_ours(csv_path, None, cache, 16, preprocess_workers=0, **limits),
        "ct1/slicing": data_path.measure_slicing(csv_path, None, cache, 16, **limits),
        "ct1/monai_cache": data_path.measure_monai_cache([str(p) for p in paths], 16, **limits),
        "ct1/torchio_naive": data_path.measure_torchio_naive([str(p) for p in paths], 16),
    }
    for name, run in runs.items():
        assert run["patches"] >= 4 and run["patches_per_s"] > 0, name
        assert run["memory_training"]["peak_rss_mb"] > 0, name
    ours = runs["ct1/ours"]
    # 48 × 2 mm → 64 voxels at 1.5 mm; 20 × 5 mm → 50 at 2 mm: the cache holds the resampled volume
    assert ours["cached_shape"][1:] == [64, 64, 50]
    assert ours["preprocessing_s"] > 0 and ours["first_batch_cached_s"] > 0
    assert ours["interleaved_with_slicing"]["ratio"] > 0
    assert ours["bytes_per_voxel"] == pytest.approx(4.0, abs=0.01)
    compact = data_path.measure_ours(csv_path, None, str(tmp_path / "int16"), 16, preprocess_workers=0,
                                     storage="int16", reference_cache=cache, **limits)
    assert compact["bytes_per_voxel"] == pytest.approx(2.0, abs=0.01)
    assert 0 < compact["max_abs_error"] <= 1e-4  # int16 over the [0, 1] window: ≤ 1/131070
    assert compact["interleaved_with_float32"]["ratio"] > 0
    compressed = data_path.measure_ours(csv_path, None, str(tmp_path / "blosc2"), 16, preprocess_workers=0,
                                        storage="float32_blosc2", reference_cache=cache, **limits)
    assert compressed["max_abs_error"] == 0.0 and compressed["bytes_per_voxel"] < 4.0  # lossless, smaller
    cold = data_path.measure_cold_preparation(csv_path, None, [str(p) for p in paths], str(tmp_path / "cold"), 16,
                                              repeats=2)
    assert len(cold["ours_s"]) == len(cold["monai_s"]) == 2 and cold["ratio_median"] > 0
    assert len(list((tmp_path / "cold").iterdir())) == 2  # each of ours prepared an empty cache of its own
    config = data_path.DataBenchConfig(volumes=1, shape=(48, 48, 20), patch=16, phantom_cases=1)
    runs["ct2/ours"], runs["ct2/cold"] = runs["ct1/ours"], cold
    section = data_path.summarize_runs(runs, config)
    assert [t["met"] for t in section["targets"]][3] is True  # same run for N and 2N: no memory growth
    (preparation,) = [t for t in section["targets"] if t["target"].startswith("data: cold cache preparation") and
                      t["value"] is not None]
    assert preparation["value"] == cold["ratio_median"]


def test_monai_pipeline_applies_the_same_preprocessing_as_ours(tmp_path):
    from data_modules.presets import Preprocessing

    path = data_path.ensure_synthetic_cts(1, (48, 48, 20), (2.0, 2.0, 5.0), root=tmp_path)[0]
    theirs = data_path.monai_transforms(16).transforms[:-1]
    item = {"image": str(path)}
    for transform in theirs:
        item = transform(item)
    import torchio as tio

    ours = Preprocessing(**data_path.PREPROCESSING).with_min_size((16, 16, 16)).apply(
        tio.Subject(image=tio.ScalarImage(path)))["image"].data
    # MONAI sizes the grid from the voxel-centre extent, TorchIO from the full extent: ±2 slices.
    assert all(abs(a - b) <= 2 for a, b in zip(item["image"].shape, ours.shape))
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert abs(float(item["image"].mean()) - float(ours.mean())) < 0.02


TINY_OVERRIDES = {
    "MAE-3D": dict(embed_dim=48, depth=1, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_heads=2),
    "SimMIM-3D": dict(feature_size=12),
    "SMIT": dict(feature_size=12, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16),
    "SelfMedHPM": dict(embed_dim=48, depth=1, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_heads=2,
                       predictor_dim=24, predictor_depth=1, predictor_heads=2),
    "AnatoMask": dict(encoder_dims=[8, 16, 32, 64, 128], decoder_width=64),
    "HybridMIM (Swin)": dict(depths=[1, 1, 1, 1]),
    "HybridMIM (UNet)": dict(unet_channels=[8, 8, 16, 16, 32]),
    "SimCLR-3D": dict(unet_channels=[4, 8, 8, 16, 16], projector_hidden_dim=32, projector_dim=16),
    "Models Genesis": dict(unet_channels=[4, 8, 8, 16], shuffle_blocks=200),
    "Volume Fusion": dict(unet_channels=[4, 8, 8, 16, 16], box_range=(2, 4)),
    "Swin UNETR SSL": dict(feature_size=6, window_size=4, contrast_dim=16),
    "VoCo": dict(feature_size=6, window_size=4, projector_hidden_dim=32, projector_dim=16),
    "DINOv2-3D": dict(patch_size=8, embed_dim=24, depth=1, num_heads=2, out_dim=64, head_hidden_dim=32,
                      head_bottleneck_dim=16, num_local_crops=2, local_size=16),
}
TINY_SIZE = {"HybridMIM (Swin)": (64, 32, 32), "HybridMIM (UNet)": (64, 32, 32), "Swin UNETR SSL": 64, "VoCo": (64, 32, 32)}


def test_the_method_table_lists_every_method_module():
    found, missing = methods.available_methods()
    assert not missing
    assert {spec.name for spec in found} == set(TINY_OVERRIDES)


#: Methods whose step runs a network without gradients: an EMA teacher, or HybridMIM's dropout twin.
WITH_EXTRA_FORWARD = {"SMIT", "SelfMedHPM", "AnatoMask", "HybridMIM (Swin)", "HybridMIM (UNet)", "VoCo", "DINOv2-3D"}


def _with_gradients(module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.grad is not None}


def test_method_filter_names_an_unknown_row_before_anything_runs():
    with pytest.raises(ValueError, match=r"--methods: unknown \['MAE'\]; choose from \['MAE-3D'"):
        methods.run(methods.MethodBenchConfig(only=("MAE-3D", "MAE")), quick=True)


@pytest.mark.parametrize("name", sorted(TINY_OVERRIDES))
def test_method_step_bare_networks_and_extra_forward_run(name):
    spec = methods.spec_named(name)
    module, optimizer, batch = methods.build_method(spec, TINY_SIZE.get(name, 32), **TINY_OVERRIDES[name])
    assert torch.isfinite(methods.method_step(module, optimizer, batch)())
    module.shared_step(batch).losses["loss"].backward()
    trained_by_the_step = _with_gradients(module)
    optimizer.zero_grad(set_to_none=True)
    loss, extra = methods.bare_networks(module, batch)
    loss().backward()
    assert _with_gradients(module) == trained_by_the_step  # the replay trains exactly the step's parameters
    optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(methods.optimizer_step(loss, optimizer)())
    assert (extra is not None) == (name in WITH_EXTRA_FORWARD)
    if extra is not None:
        extra()


def test_method_profile_counts_flops_and_saved_activations():
    out = methods.profile_method("MAE-3D", 32, steps=1, **TINY_OVERRIDES["MAE-3D"])
    assert out["flops"] > 1e6 and out["activation_mb"] > 0 and out["trainable_parameters"] > 0


def test_overhead_profile_ranks_operators_by_their_excess_over_the_bare_step():
    out = methods.profile_overhead("SelfMedHPM", 32, rows=1000, **TINY_OVERRIDES["SelfMedHPM"])
    excess = [row[3] for row in out["top"]]
    assert len(excess) > 5 and excess == sorted(excess, reverse=True)
    assert all(row[3] == pytest.approx(row[1] - row[2]) for row in out["top"])
    lerp = [row for row in out["top"] if row[0] == "aten::lerp_"]  # the EMA teacher update is only in the step
    assert len(lerp) == 1 and lerp[0][2] == 0.0 and lerp[0][3] > 0
    assert out["step_total_ms"] > 0 and out["bare_total_ms"] > 0


def test_mae_vs_monai_and_mask_ratio_sweep_time_both_sides():
    out = methods.time_mae_vs_monai(32, warmup=0, repeats=1)
    assert set(out["timings"]) == {"ours", "monai"}
    sweep = scaling.time_mask_ratios("MAE-3D", 32, (0.5, 0.75), 0, 1, **TINY_OVERRIDES["MAE-3D"])
    assert set(sweep["timings"]) == {"0.5", "0.75"}


def test_methods_and_scaling_summaries_build_tables_and_targets():
    specs = [methods.spec_named("MAE-3D")]
    timing = {"timings": {"step": {"median_s": 1.1}, "bare": {"median_s": 1.0}}}
    runs = {"MAE-3D@64": {"timing": timing, "profile": {"flops": 2e9, "activation_mb": 10.0,
                                                         "process": {"peak_rss_mb": 900.0}}}}
    monai = {64: {"timing": {"timings": {"ours": {"median_s": 0.7}, "monai": {"median_s": 1.0}}}, "ours": {},
                  "monai": {}}}
    section = methods.summarize(runs, monai, specs, methods.MethodBenchConfig(rois=(64,)), [])
    assert [t["met"] for t in section["targets"]] == [True, True, True]  # overhead, without teacher, vs MONAI
    assert section["tables"][0]["rows"][0][6] == pytest.approx(1.1)
    runs["MAE-3D@64"]["timing"]["timings"]["step"]["median_s"] = 1.5
    runs["MAE-3D@64"]["overhead_profile"] = {"top": [["aten::addmm", 9.0, 4.0, 5.0]], "step_total_ms": 15.0,
                                             "bare_total_ms": 10.0}
    missed = methods.summarize(runs, monai, specs, methods.MethodBenchConfig(rois=(64,)), [])
    assert [t["met"] for t in missed["targets"]] == [False, False, True]
    assert missed["tables"][-1]["rows"] == [["aten::addmm", 9.0, 4.0, 5.0]] and "MAE-3D at 64³" in missed["tables"][-1]["title"]
    scaled = scaling.summarize({"MAE-3D@128": {"timings": {"step": {"median_s": 5.0}}, "flops": 8e9}}, specs,
                               section, scaling.ScalingConfig(mask_ratios=(0.5,)), [])
    rows = scaled["tables"][0]["rows"]
    assert [row[1] for row in rows] == ["64³", "128³"] and rows[1][2] == 5.0 and rows[1][4] == 8.0


def test_sliding_window_sides_agree():
    config = evaluation.EvalBenchConfig(roi=32, timing_volume=(40, 36, 32), network_kwargs=dict(
        hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8), full_ct=False, warmup=0, repeats=1)
    out = evaluation.time_sliding_window(config)
    assert out["same_prediction"] is True
    section = evaluation.summarize(out, {}, config)
    assert section["targets"][0]["value"] is not None and section["notes"] == []
    failed = evaluation.summarize({"error": "Traceback ...\nAttributeError: no sw_batch_size"}, {}, config)
    assert failed["targets"][0]["met"] is None
    assert failed["notes"] == ["timing failed: AttributeError: no sw_batch_size (traceback in the JSON)"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method, losses", [("smit", {"mip", "patch_distill", "cls_distill"}), ("simmim3d", {"mip"})])
def test_study_diagnosis_records_curves_probe_and_loads_the_export_tensor_by_tensor(tmp_path, method, losses):
    from benchmarks import diagnose_study_method as diagnosis

    diagnosis.main(["--methods", method, "--steps", "2", "--probe_every", "1", "--output", str(tmp_path)])
    result = json.loads((tmp_path / "diagnosis.json").read_text())
    (run,) = result["runs"]
    assert [row["step"] for row in run["probe"]] == [0, 1, 2]
    assert len(run["curve"]) == 2 and losses <= set(run["curve"][0])
    dependence = run["input_dependence"]
    assert set(dependence) == {"step 0", "step 2"}
    assert all(values["mip_l1_own"] > 0 and -1 <= values["global_token_cosine"] <= 1 for values in dependence.values())
    probe, finetune = result["loading"]
    for check in (probe, finetune):
        assert check["missing"] == check["mismatched"] == check["unexpected"] == 0
        assert check["start_equals_file"] == check["file_tensors"] > 0
    assert probe["end_equals_file_encoder"] == probe["file_encoder_tensors"]  # frozen encoder untouched
    assert finetune["max_abs_change_encoder"] > 0
