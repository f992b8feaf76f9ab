"""NaN/Inf guard through the real CLI and Trainer: a poisoned loss (test callback wrapping the method's
real step) must never reach the weights; ``stop`` saves the last good state and names the step
and the terms; ``skip`` drops the update (student, EMA teacher and optimizer state unchanged),
counts it, and stops past ``max_skipped_steps``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from reliability_probes import REPO

from lightning_mim.cli import main
from lightning_mim.reliability.nan_guard import NonFiniteGuard, NonFiniteLossError

CONFIGS = REPO / "tests" / "configs"


def fit_args(method: str, tmp_path: Path, poison_steps: list[int], value: str, *extra: str) -> list[str]:
    callbacks = (
        "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {every_n_train_steps: 1, save_top_k: -1, save_last: true}}, "
        f"{{class_path: reliability_probes.PoisonLoss, init_args: {{steps: {poison_steps}, value: {value}}}}}]"
    )
    return ["fit", "--config", str(REPO / f"experiments/{method}.yaml"), "--config", str(CONFIGS / f"{method}_tiny.yaml"),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks", callbacks,
            "--trainer.num_sanity_val_steps", "0", *extra]


def checkpoint(tmp_path: Path, step: int | str) -> dict:
    name = "last.ckpt" if step == "last" else f"epoch=*-step={step}.ckpt"
    (path,) = next(tmp_path.rglob("checkpoints")).glob(name)
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for group_a, group_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in group_a:
            assert torch.equal(torch.as_tensor(group_a[name]), torch.as_tensor(group_b[name])), name


def test_stop_names_the_step_and_terms_and_keeps_the_last_good_state(tmp_path):
    with pytest.raises(NonFiniteLossError) as error:
        main(fit_args("mae", tmp_path, [2], ".nan"))

    message = str(error.value)
    assert "non-finite training loss at global step 2 (epoch 1, batch 0: loss=nan, reconstruction=nan)" in message
    assert str(next(tmp_path.rglob("checkpoints")) / "last.ckpt") in message
    good, saved = checkpoint(tmp_path, 2), checkpoint(tmp_path, "last")
    assert saved["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert_same_state(good, saved)


def test_skip_drops_the_update_counts_it_and_stops_past_the_maximum(tmp_path):
    with pytest.raises(NonFiniteLossError) as error:
        main(fit_args("selfmedhpm", tmp_path, [1, 3], ".inf", "--nan_guard.action", "skip",
                      "--nan_guard.max_skipped_steps", "1"))

    message = str(error.value)
    assert "global step 3 (epoch 1, batch 1: loss=inf, reconstruction=inf)" in message
    assert "after 2 skipped steps (max_skipped_steps=1)" in message
    before, after_skip = checkpoint(tmp_path, 1), checkpoint(tmp_path, 2)
    assert_same_state(before, after_skip)  # student, EMA teacher and AdamW moments untouched
    assert any(k.startswith("teacher.") for k in before["state_dict"])
    trained, last = checkpoint(tmp_path, 3), checkpoint(tmp_path, "last")
    assert not torch.equal(trained["state_dict"]["encoder.patch_embed.proj.weight"],
                           after_skip["state_dict"]["encoder.patch_embed.proj.weight"])  # training went on
    assert_same_state(trained, last)
    assert last["callbacks"]["NonFiniteGuard"] == {"skipped_steps": 2}

    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = {}
    for row in csv.DictReader(metrics.open()):
        if row.get("train/skipped_nonfinite_steps"):
            logged[int(row["step"])] = float(row["train/skipped_nonfinite_steps"])
    assert logged[0] == 0 and logged[1] == 1 and logged[2] == 1


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match="action must be 'stop' or 'skip'"):
        NonFiniteGuard(action="ignore")
    with pytest.raises(ValueError, match="max_skipped_steps"):
        NonFiniteGuard(max_skipped_steps=-1)
