"""The online segmentation probe (lightning_mim/callbacks/probe.py): its blocks, every method's encoder, and
that probing leaves the training run untouched (random streams, modes, gradients, autocast, losses).

The exact-resume check with the probe on is in tests/reliability/test_exact_resume.py.
"""

from __future__ import annotations

import importlib
import json
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_mim.callbacks.probe import (
    SegmentationProbe,
    fit_head,
    organ_centred_crops,
    pooled_dice,
    soft_targets,
    voxel_rows,
)
from lightning_mim.segmentation.features import encoder_features, features_on_grid

ROOT = Path(__file__).resolve().parent.parent
PROBE_DATA = {"phantom_cases": 4, "phantom_shape": [64, 64, 32]}
FAST = {"crops_per_case": 2, "head_steps": 20, "data": PROBE_DATA}
# (experiment recipe, its tiny test overrides) of every method.
METHODS = [("mae", "mae_tiny"), ("selfmedhpm", "selfmedhpm_tiny"), ("simmim", "simmim_tiny"), ("smit", "smit_tiny"),
           ("anatomask", "anatomask_tiny"), ("hybridmim_swin", "hybridmim_swin_tiny"),
           ("hybridmim_unet", "hybridmim_unet_tiny")]


def tiny_method(recipe: str, tiny: str):
    model = yaml.safe_load((ROOT / "experiments" / f"{recipe}.yaml").read_text())["model"]
    overrides = (yaml.safe_load((ROOT / "tests" / "configs" / f"{tiny}.yaml").read_text()).get("model") or {})
    args = {**model["init_args"], **overrides.get("init_args", {})}
    if "depth" in args:  # ViT methods: the probe reads the UNETR-style export, which needs 16³ token patches
        args.update(patch_size=16)
    module_name, _, class_name = model["class_path"].rpartition(".")
    torch.manual_seed(0)
    return getattr(importlib.import_module(module_name), class_name)(**args)


def no_trainer(step: int = 0):
    return types.SimpleNamespace(datamodule=None, global_step=step, loggers=[], is_global_zero=True)


# --------------------------------------------------------------------------- blocks
def test_crops_centre_on_every_organ_in_turn_and_stay_inside_the_volume():
    label = torch.zeros(40, 40, 20, dtype=torch.long)
    label[2:6, 30:36, 1:4] = 1
    label[20:30, 5:9, 10:18] = 3
    image = torch.arange(label.numel(), dtype=torch.float32).reshape(1, *label.shape)
    crops = organ_centred_crops(image, label, (16, 16, 8), 4, torch.Generator().manual_seed(0))
    assert [int(crop[1].max()) for crop in crops] == [1, 3, 1, 3]
    for crop_image, crop_label in crops:
        assert crop_image.shape == (1, 16, 16, 8) and crop_label.shape == (16, 16, 8)
        flat = int(crop_image[0, 0, 0, 0])  # the crop is a window of the volume, cut where it starts
        a, b, c = np.unravel_index(flat, label.shape)
        assert torch.equal(crop_label, label[a:a + 16, b:b + 16, c:c + 8])
    again = organ_centred_crops(image, label, (16, 16, 8), 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(crops, again))
    with pytest.raises(ValueError, match="smaller than the probe's crop"):
        organ_centred_crops(image, label, (48, 16, 8), 1, torch.Generator())


def test_head_fitted_on_informative_features_segments_and_on_noise_does_not():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8, 8), generator=generator)
    targets = voxel_rows(soft_targets(labels, 3, (8, 8, 8)))
    assert torch.equal(targets.argmax(1), labels.reshape(-1))  # a 1-voxel cell's fractions are its one-hot label
    informative = torch.cat([targets * 3, torch.randn(len(targets), 5, generator=generator)], dim=1)
    head = fit_head(informative, targets, hidden=0, steps=60, lr=0.1, generator=generator)
    predicted = head(informative).argmax(1).reshape(labels.shape)
    assert min(pooled_dice(predicted[:, None], labels[:, None], 3)) > 0.95
    noise = torch.randn(len(targets), 8, generator=generator)
    head = fit_head(noise[: len(noise) // 2], targets[: len(noise) // 2], hidden=0, steps=60, lr=0.1, generator=generator)
    held_out = head(noise[len(noise) // 2:]).argmax(1).reshape(1, 8, 8, 8)
    assert max(pooled_dice(held_out[:, None], labels[1:, None], 3)) < 0.6


def test_pooled_dice_counts_voxels_over_all_crops_and_skips_absent_organs():
    labels = torch.zeros(2, 1, 2, 2, 2, dtype=torch.long)
    labels[0, 0, 0, 0, :] = 1  # 2 voxels of class 1 in the first crop, 2 in the second
    labels[1, 0, 1, 1, :] = 1
    predictions = labels.clone()
    predictions[1] = 0  # the second crop misses its organ: Dice 2·2 / (2 + 4)
    dice = pooled_dice(predictions, labels, 3)
    assert dice[0] == pytest.approx(4 / 6) and np.isnan(dice[1])


def test_feature_maps_are_pooled_or_interpolated_onto_one_grid():
    fine, coarse = torch.arange(64.0).reshape(1, 1, 4, 4, 4), torch.ones(1, 2, 1, 1, 1)
    out = features_on_grid([fine, coarse], (2, 2, 2))
    assert out.shape == (1, 3, 2, 2, 2)
    assert out[0, 0, 0, 0, 0] == fine[0, 0, :2, :2, :2].mean() and torch.all(out[0, 1:] == 1)


# --------------------------------------------------------------------------- every method's encoder
@pytest.mark.parametrize(("recipe", "tiny"), METHODS)
def test_every_method_encoder_is_probed_through_its_export(recipe, tiny):
    method = tiny_method(recipe, tiny)
    probe = SegmentationProbe(**{**FAST, "fit_cases": 1, "eval_cases": 1})  # two crops: Swin at 64³ is slow on CPU
    probe.setup_probe(no_trainer(), method)
    export = method.export_encoder()
    maps = encoder_features(export.target, probe._network, torch.zeros(1, 1, *method.input_size))
    assert maps and all(m.ndim == 5 for m in maps)
    metrics = probe.probe(method)
    organs = {f"probe/dice/{name}" for name in probe.class_names[1:]}
    assert set(metrics) - {"probe/dice_mean"} <= organs and len(metrics) > 1
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # the probe reads the method's current weights: after a change to the encoder the features change
    before = probe.features(probe._crops["eval"][0][:1])
    with torch.no_grad():
        for name, parameter in method.named_parameters():
            if name.startswith(("encoder.", "student.encoder.", "network.encoder.")) and parameter.ndim > 1:
                parameter.mul_(0.5)
    probe.probe(method)
    assert not torch.allclose(before, probe.features(probe._crops["eval"][0][:1]))


def test_a_method_that_cannot_export_fails_before_training():
    from lightning_mim.methods.mae import MAE3D

    # UNETR-style networks take ViTs of any depth but only 16³ token patches
    fine_patches = MAE3D(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, decoder_dim=24,
                         decoder_depth=1, decoder_heads=2)
    with pytest.raises(ValueError, match="MAE3D cannot be probed.*patch size 8"):
        SegmentationProbe(**FAST).setup_probe(no_trainer(), fine_patches)


def test_bad_settings_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SegmentationProbe(every_n_steps=0)
    with pytest.raises(ValueError, match=r"unknown keys \['datalst'\]"):
        SegmentationProbe(data={"datalst": "x.json"})
    with pytest.raises(ValueError, match="patch_size is set by the probe"):
        SegmentationProbe(data={"patch_size": 32})
    SegmentationProbe(data={"datalist": "x.json", "cache_storage": "int16"})  # own and shared data arguments


# --------------------------------------------------------------------------- isolation
def test_probing_leaves_random_streams_modes_gradients_and_autocast_alone():
    method = tiny_method("anatomask", "anatomask_tiny")
    method.train()
    method.network.encoder.eval()  # a mixed state must come back as it was
    modes = {name: module.training for name, module in method.named_modules()}
    state = {k: v.clone() for k, v in method.state_dict().items()}
    probe = SegmentationProbe(**FAST)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe.run(no_trainer(), method)
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert {name: module.training for name, module in method.named_modules()} == modes
    assert all(p.grad is None for p in method.parameters()) and torch.is_grad_enabled()
    assert all(torch.equal(state[k], v) for k, v in method.state_dict().items())
    first = probe.history[-1]
    probe.run(no_trainer(step=5), method)  # same weights, same crops, same head seed: same numbers
    second = probe.history[-1]
    assert {k: v for k, v in first.items() if "dice" in k} == {k: v for k, v in second.items() if "dice" in k}


def _fit(tmp_path: Path, name: str, probe: bool) -> tuple[dict[int, float], dict]:
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    from reliability_probes import read_losses

    from lightning_mim.cli import main

    losses = tmp_path / f"{name}.jsonl"
    args = ["fit", "--config", str(ROOT / "experiments" / "mae.yaml"), "--config", str(ROOT / "tests" / "configs" / "mae_tiny.yaml"),
            "--model.init_args.depth", "12", "--trainer.default_root_dir", str(tmp_path / name),
            "--trainer.logger.init_args.save_dir", str(tmp_path / name), "--trainer.max_epochs", "1"]
    if probe:
        args += ["--trainer.callbacks+=lightning_mim.callbacks.probe.SegmentationProbe",
                 "--trainer.callbacks.init_args.every_n_steps", "1", "--trainer.callbacks.init_args.head_steps", "20",
                 "--trainer.callbacks.init_args.crops_per_case", "2",
                 "--trainer.callbacks.init_args.data", json.dumps(PROBE_DATA)]
    args += ["--trainer.callbacks+=reliability_probes.LossRecorder", "--trainer.callbacks.init_args.path", str(losses)]
    main(args)
    return read_losses(losses), tmp_path / name


def logged_probe_rows(save_dir: Path) -> list[dict]:
    """History rows of the offline W&B run that carry probe metrics."""
    from test_slurm import wandb_records

    rows = []
    for record in wandb_records(next((save_dir / "wandb").glob("offline-run-*"))):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if any(key.startswith("probe/") for key in items):
                rows.append(items)
    return rows


@pytest.mark.timeout(300)
def test_training_with_the_probe_gives_the_losses_of_training_without_it_and_logs_dice_to_wandb(tmp_path):
    without, _ = _fit(tmp_path, "without", probe=False)
    with_probe, save_dir = _fit(tmp_path, "with", probe=True)
    assert len(without) >= 2 and with_probe == without  # exact: same masks, same crops, same updates
    rows = logged_probe_rows(save_dir)
    assert [row["trainer/global_step"] for row in rows] == [0, *sorted(without)]  # at start, then every step
    assert all("probe/dice_mean" in row and "probe/dice/liver" in row and row["probe/cost_fraction"] > 0 for row in rows)


def test_benchmark_summary_reports_the_share_of_wall_time_and_a_failed_measurement():
    from benchmarks import probe as bench

    assert bench.cost_share(probe_s=10.0, step_s=0.2, every_n_steps=450) == pytest.approx(0.1)
    config = bench.ProbeBenchConfig(every_n_steps=(100,))
    measured = {"step_s": 0.2, "probe_s": 10.0, "setup_s": 3.0, "crops": {"fit": 8, "eval": 8},
                "defaults": {"every_n_steps": 500}}
    section = bench.summarize(measured, config)
    assert [row[0] for row in section["tables"][0]["rows"]] == [100, 500]
    assert section["targets"][0]["value"] == pytest.approx(10 / 110) and section["targets"][0]["met"] is True
    failed = bench.summarize({"error": "Traceback ...\nValueError: boom"}, config)
    assert failed["targets"][0]["met"] is None and "ValueError: boom" in failed["notes"][0]
