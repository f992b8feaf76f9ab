"""The label-efficiency study: statistics against hand-computed values, phantom pools, and the fast study end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from data_modules.phantoms import ORGAN_NAMES, ensure_phantom_pools, generate_phantom
from lightning_mim.segmentation.evaluation import case_metrics
from lightning_mim.study.statistics import mean_sd, paired_bootstrap_ci


# --------------------------------------------------------------------------- statistics
def test_mean_sd_uses_the_sample_sd_and_ignores_nan():
    assert mean_sd([1.0, 2.0, 3.0, math.nan]) == (2.0, 1.0)
    assert mean_sd([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_sd([math.nan]))


def test_paired_bootstrap_ci_matches_the_exact_bootstrap_distribution():
    # One seed, cases with differences 0, 0, 3: a replicate's mean is k (k = how often 3 was drawn, Binomial(3, 1/3)),
    # P(0) = 8/27 > 2.5 % and P(3) = 1/27 = 3.7 % > 2.5 %, so the 95 % percentile interval is exactly [0, 3].
    assert paired_bootstrap_ci(np.array([[0.0, 0.0, 3.0]]), replicates=4000, seed=1) == (1.0, 0.0, 3.0)
    # Two cases 0 and 1: replicate means 0, 0.5, 1 with P(0) = P(1) = 1/4 → [0, 1].
    assert paired_bootstrap_ci(np.array([[0.0, 1.0]]), seed=0) == (0.5, 0.0, 1.0)
    # A constant difference has a degenerate interval; seeds are resampled too (rows).
    assert paired_bootstrap_ci(np.full((3, 4), 0.25), seed=0) == (0.25, 0.25, 0.25)
    low, high = paired_bootstrap_ci(np.array([[0.1, 0.1], [0.3, 0.3]]), seed=0)[1:]
    assert (low, high) == (pytest.approx(0.1), pytest.approx(0.3))


def test_paired_bootstrap_ci_ignores_missing_cases_and_is_seeded():
    matrix = np.array([[0.2, math.nan, 0.4], [0.1, math.nan, 0.5]])
    first, again = paired_bootstrap_ci(matrix, seed=3), paired_bootstrap_ci(matrix, seed=3)
    assert first == again and first[0] == pytest.approx(0.3) and 0.1 <= first[1] < first[2] <= 0.5
    assert all(math.isnan(v) for v in paired_bootstrap_ci(np.full((2, 2), math.nan)))


def test_normalised_surface_dice_of_a_shifted_cube_by_hand():
    # A 4³ cube shifted by one voxel: each surface has 56 voxels, 36 on the other surface and 20 one voxel
    # away, so NSD = (36 + 36) / 112 at a tolerance below one voxel and 1 at one voxel.
    label = torch.zeros(12, 12, 12, dtype=torch.long)
    label[2:6, 4:8, 4:8] = 1
    prediction = torch.zeros_like(label)
    prediction[3:7, 4:8, 4:8] = 1
    tight = case_metrics(prediction, label, 3, [1.0, 1.0, 1.0], nsd_tolerance=0.5)
    assert tight["nsd"][0] == pytest.approx(72 / 112) and math.isnan(tight["nsd"][1])  # class 2 absent: NaN
    assert case_metrics(prediction, label, 3, [1.0, 1.0, 1.0], nsd_tolerance=1.0)["nsd"][0] == pytest.approx(1.0)
    # In mm: with 2 mm voxels the one-voxel shift is 2 mm, outside a 1.5 mm tolerance.
    assert case_metrics(prediction, label, 3, [2.0, 2.0, 2.0], nsd_tolerance=1.5)["nsd"][0] == pytest.approx(72 / 112)


# --------------------------------------------------------------------------- phantoms
STUDY_SHAPE, STUDY_SPACING = (48, 48, 32), (6.5, 6.5, 5.0)


def test_phantoms_are_deterministic_and_every_organ_is_several_voxels_across():
    from scipy.ndimage import distance_transform_edt

    for case in range(4):
        hu, labels = generate_phantom(STUDY_SHAPE, STUDY_SPACING, np.random.default_rng(case), lesions=True)
        hu_again, labels_again = generate_phantom(STUDY_SHAPE, STUDY_SPACING, np.random.default_rng(case), lesions=True)
        assert np.array_equal(hu, hu_again) and np.array_equal(labels, labels_again)
        for index, organ in enumerate(ORGAN_NAMES, start=1):
            mask = labels == index
            # Inscribed radius >= √2 voxels: somewhere the organ holds a 3-voxel-wide cross of voxels in every plane.
            assert mask.any() and distance_transform_edt(mask).max() >= 1.4, (case, organ)


def test_phantoms_vary_between_cases():
    first = generate_phantom(STUDY_SHAPE, STUDY_SPACING, np.random.default_rng(0))[1]
    second = generate_phantom(STUDY_SHAPE, STUDY_SPACING, np.random.default_rng(1))[1]
    volumes = [[(labels == i).sum() for i in range(1, 9)] for labels in (first, second)]
    assert all(abs(a - b) / max(a, b) > 0.02 for a, b in zip(*volumes))  # every organ differs in size


def test_phantom_pools_are_disjoint_and_keep_their_test_split(tmp_path):
    small = ensure_phantom_pools(tmp_path, unlabelled=2, labelled=2, test=2, shape=(32, 32, 16))
    large = ensure_phantom_pools(tmp_path, unlabelled=3, labelled=2, test=2, shape=(32, 32, 16))
    labelled = json.loads(small["labelled"].read_text())
    unlabelled = json.loads(small["unlabelled"].read_text())
    images = {"train": {c["image"] for c in labelled["training"]}, "test": {c["image"] for c in labelled["validation"]},
              "unlabelled": {c["image"] for c in unlabelled["training"]}}
    assert [len(v) for v in images.values()] == [2, 2, 2]
    assert not (images["train"] & images["test"]) and not (images["unlabelled"] & (images["train"] | images["test"]))
    assert all("label" not in c for c in unlabelled["training"])

    def digests(pools):
        manifest = json.loads((pools["labelled"].parent / "manifest.json").read_text())["sha256"]
        cases = json.loads(pools["labelled"].read_text())
        return [manifest[c["image"].removeprefix("./")] for c in cases["training"] + cases["validation"]]

    assert digests(small) == digests(large)  # a larger unlabelled pool leaves the labelled and test cases unchanged


# --------------------------------------------------------------------------- the study, fast mode
def test_fast_demo_and_study_end_to_end_resume_and_reproduce_their_table(tmp_path, monkeypatch, capsys):
    """``demo --fast`` (the short study: MAE-3D, pre-train, export, probe and fine-tune vs scratch) prints
    the per-organ table; ``study`` with the demo's config then reuses every arm, and recomputing three
    arms from scratch gives the same encoder and the same table. One run of both commands, whose fast
    modes run the same arms, keeps the default suite short."""
    from lightning_mim.cli import main
    from lightning_mim.demo import DEMO_RECIPE
    from lightning_mim.recipes import find_recipe
    from lightning_mim.segmentation.weights import read_encoder_file

    monkeypatch.setenv("LMIM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LMIM_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "study"
    assert main(["demo", "--fast", "true", "--output", str(output), "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "ETA" in out and "pre-train mae3d: done" in out
    assert "| frozen probe (1 labelled) | liver |" in out and "| fine-tune, 1 labelled | pancreas |" in out
    exported = read_encoder_file(next(output.glob("pretrain/mae3d-*/encoder.pt")))  # by the EncoderExport callback
    assert exported.target == "unetr" and exported.method == "mae3d" and exported.meta["global_step"] == 2

    report = output / "report"
    table = json.loads((report / "study.json").read_text())["rows"]
    csv_before = (report / "study.csv").read_text()
    assert {(r["evaluation"], r["labelled_cases"]) for r in table} == {("probe", 1), ("finetune", 1)}
    assert {r["organ"] for r in table} == {*ORGAN_NAMES, "mean"}
    mean = next(r for r in table if r["organ"] == "mean" and r["evaluation"] == "finetune")
    assert mean["seeds"] == 2 and mean["method"] == "mae3d" and mean["network"] == "unetr"
    assert 0.0 <= mean["dice_pretrained_mean"] <= 1.0 and 0.0 <= mean["nsd_scratch_mean"] <= 1.0
    assert mean["dice_ci_low"] <= mean["dice_difference"] <= mean["dice_ci_high"]
    assert (report / "study_label_efficiency.png").stat().st_size > 0
    assert (tmp_path / "results" / "study-demo.md").is_file()
    arms = sorted(output.glob("*/*/result.json"))
    assert len(arms) == 1 + 2 * 2 * 2  # pre-training + (probe, fine-tune) × 2 seeds × (pre-trained, scratch)
    assert all((a.parent / "command.sh").read_text().count("python -m lightning_mim ") >= 1 for a in arms)

    # The study command on the same config: every arm is reused. Then recompute the pre-training and two
    # evaluation arms from scratch: the same seeds give the same encoder and the same table.
    study = ["study", "--config", str(find_recipe(DEMO_RECIPE)), "--fast", "true", "--output", str(output)]
    assert main(study) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(": running" in line for line in lines) and sum("reused" in line for line in lines) == len(arms)
    assert (report / "study.csv").read_text() == csv_before
    for result in [next(output.glob("pretrain/*/result.json")), next(output.glob("probe/scratch*-s1-*/result.json")),
                   next(output.glob("finetune/mae3d*-s0-*/result.json"))]:
        result.unlink()
    assert main(study) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(": running" in line for line in lines) == 3
    assert (report / "study.csv").read_text() == csv_before


def test_two_spellings_of_one_network_give_one_scratch_arm():
    """HybridMIM writes Swin UNETR's default norm arguments out, SimMIM-3D leaves them implicit: same network."""
    from monai.networks.nets import SwinUNETR

    from lightning_mim.segmentation.networks import without_defaults

    implicit = {"in_channels": 1, "feature_size": 12, "depths": [1, 1, 1, 1], "window_size": 4, "spatial_dims": 3}
    explicit = {**implicit, "norm_name": "instance", "normalize": True}
    assert without_defaults("swin_unetr", explicit) == without_defaults("swin_unetr", implicit)
    assert without_defaults("swin_unetr", explicit) == {"in_channels": 1, "feature_size": 12, "depths": [1, 1, 1, 1],
                                                        "window_size": 4}
    # A non-default value stays, so different networks stay different arms, and the kept set builds the same network.
    assert without_defaults("swin_unetr", {**implicit, "normalize": False})["normalize"] is False
    torch.manual_seed(0)
    full = SwinUNETR(out_channels=3, **explicit).state_dict()
    torch.manual_seed(0)
    short = SwinUNETR(out_channels=3, **without_defaults("swin_unetr", explicit)).state_dict()
    assert full.keys() == short.keys() and all(torch.equal(full[k], short[k]) for k in full)


def test_plot_draws_one_scratch_curve_per_network_as_built(tmp_path, monkeypatch):
    """SMIT's Swin UNETR and SimMIM-3D's are one network name with two scratch curves; both must be drawn."""
    import matplotlib.pyplot as plt

    from lightning_mim.study.report import MEAN, plot_label_efficiency

    def row(method, cases, scratch):
        return {"method": method, "network": "swin_unetr", "evaluation": "finetune", "organ": MEAN,
                "labelled_cases": cases, "dice_pretrained_mean": 0.5, "dice_pretrained_sd": 0.1,
                "dice_scratch_mean": scratch, "dice_scratch_sd": 0.1}

    table = [row("simmim3d", 1, 0.2), row("simmim3d", 4, 0.3), row("hybridmim_swin", 1, 0.2),
             row("hybridmim_swin", 4, 0.3), row("smit", 1, 0.1), row("smit", 4, 0.15)]
    legends = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (legends.extend(t.get_text() for t in figure.axes[0].get_legend().get_texts()),
                                                      close(figure)))
    plot_label_efficiency(table, tmp_path / "plot.png")
    assert [t for t in legends if t.startswith("scratch")] == ["scratch (swin_unetr)", "scratch (swin_unetr as smit builds it)"]


# --------------------------------------------------------------------------- study configs
def test_every_study_method_has_its_recipe_and_cpu_scale_layer_and_phantoms_more_extends_phantoms():
    from lightning_mim.recipes import find_recipe
    from lightning_mim.study.runner import METHOD_RECIPES, STUDY_RECIPES, build_parser

    for method, recipe in METHOD_RECIPES.items():
        assert find_recipe(recipe).is_file(), method
        layer = find_recipe(f"{STUDY_RECIPES}/pretrain/{method}.yaml")
        assert yaml.safe_load(layer.read_text())["model"]["init_args"]["lr"] == 1.0e-3, method
    parser = build_parser()
    base = parser.parse_args(["--config", str(find_recipe(f"{STUDY_RECIPES}/phantoms.yaml"))])
    more = parser.parse_args(["--config", str(find_recipe(f"{STUDY_RECIPES}/phantoms-more.yaml"))])
    assert set(more.methods).isdisjoint(base.methods) and set(base.methods) | set(more.methods) == set(METHOD_RECIPES)
    differences = {key for key in vars(base) if key != "__path__" and base[key] != more[key]}
    assert differences == {"config", "name", "methods", "report_folder"}  # same pools, steps, seeds, output folder


def test_progress_eta_estimates_fine_tuning_from_the_probe_arms_not_from_pre_training():
    from lightning_mim.study.runner import Arm, Progress

    arms = [Arm("pretrain", "p")] + [Arm("probe", f"a{i}") for i in range(2)] + [Arm("finetune", f"f{i}") for i in range(4)]
    progress = Progress(arms)
    assert progress.eta() == "ETA: after the first arm"
    progress.line(arms[0], "done", 600.0)  # pre-training: 10 min
    assert progress.eta() == "ETA 60.0 min"  # nothing else measured yet: 6 arms × the only mean there is
    progress.line(arms[1], "done", 30.0)
    # 1 probe and 4 fine-tuning arms left, all at the probe's 30 s: 2.5 min (not 4 × the 315 s overall mean).
    assert progress.eta() == "ETA 2.5 min"
    progress.line(arms[3], "done", 90.0)
    assert progress.eta() == "ETA 5.0 min"  # 1 probe × 30 s + 3 fine-tuning × 90 s


def test_demo_config_is_the_study_config_cut_down_so_its_arms_are_the_studys():
    """The README reads the demo's table as the study's rows: same pools, steps, seeds, ROIs and statistics."""
    from lightning_mim.demo import DEMO_RECIPE
    from lightning_mim.recipes import find_recipe

    demo = yaml.safe_load(find_recipe(DEMO_RECIPE).read_text())
    study = yaml.safe_load(find_recipe("study/phantoms.yaml").read_text())
    assert set(demo["methods"]) <= set(study["methods"]) and set(demo["budgets"]) <= set(study["budgets"])
    cut = {"name", "output", "methods", "budgets"}
    assert {k: v for k, v in demo.items() if k not in cut} == {k: v for k, v in study.items() if k not in cut}
