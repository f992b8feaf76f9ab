"""A run never silently becomes another run: auto-resume continues a run only with its own config.

Through the real CLI (its ``main``, in this process, as ``python -m lightning_mim`` calls it) into one
output folder: the same command resumes its run; a changed hyper-parameter or a changed width starts a
new run with its own folder (no traceback) and says what differed; the first run's files stay byte for
byte as they were; ``--resume_with_changes`` continues the latest run and records the changes beside
(never over) its saved config; a ``--trainer.default_root_dir`` that would not hold the run's outputs is
refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from reliability_probes import REPO

# One optimizer step, no validation, no panels: each call is a few seconds of model work.
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--data.init_args.phantom_cases", "2", "--data.init_args.val_fraction", "0.5"]


def fit(tmp_path: Path, *extra: str, root: Path | None = None, run: bool = True) -> str | list[str]:
    """Runs the CLI and returns what it logged (``run=False``: only its arguments)."""
    runs = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml"),
            "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]",
            *TINY, "--trainer.default_root_dir", str(root or runs), "--trainer.logger.init_args.save_dir", str(runs),
            "--data.init_args.phantom_root", str(tmp_path / "phantoms"),
            "--data.init_args.cache_dir", str(tmp_path / "cache"), *extra]
    if not run:
        return args
    from lightning_mim.cli import main

    messages: list[str] = []
    recorder = logging.Handler(logging.INFO)
    recorder.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch")  # where rank_zero_info writes (to stderr, on the console)
    logger.addHandler(recorder)
    try:
        assert main(args) == 0
    finally:
        logger.removeHandler(recorder)
    return "\n".join(messages)


def run_folders(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "runs" / "lightning-mim").iterdir() if p.is_dir()}


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(900)
def test_auto_resume_continues_only_the_run_started_with_the_same_config(tmp_path):
    runs = tmp_path / "runs" / "lightning-mim"
    fit(tmp_path)
    (first,) = run_folders(tmp_path)
    first_files = fingerprint(runs / first)
    assert yaml.safe_load((runs / first / "lightning_config.yaml").read_text())["model"]["init_args"]["lr"] != 1e-3

    # a changed hyper-parameter: a new run, one line naming the setting, the first run untouched
    logged = fit(tmp_path, "--model.init_args.lr", "1e-3")
    (second,) = run_folders(tmp_path) - {first}
    line = next(line for line in logged.splitlines() if f"new run {second}" in line)
    assert f"latest run {first}" in line and "model.init_args.lr" in line and "0.001" in line, line
    assert "auto-resume" not in logged
    assert yaml.safe_load((runs / second / "lightning_config.yaml").read_text())["model"]["init_args"]["lr"] == 1e-3
    assert (runs / second / "checkpoints" / "last.ckpt").is_file()

    # a changed width: a new run too, not a state-dict mismatch
    logged = fit(tmp_path, "--model.init_args.embed_dim", "24")
    (third,) = run_folders(tmp_path) - {first, second}
    assert "model.init_args.embed_dim" in next(line for line in logged.splitlines() if f"new run {third}" in line)

    # the first command again: it continues the first run (its config matches), nothing new
    logged = fit(tmp_path)
    assert f"auto-resume: continuing from {runs / first / 'checkpoints' / 'last.ckpt'}" in logged
    assert run_folders(tmp_path) == {first, second, third}
    assert fingerprint(runs / first) == first_files

    # explicitly allowed changes continue the latest run and are recorded beside its saved config
    logged = fit(tmp_path, "--model.init_args.lr", "2e-3", "--resume_with_changes", "true")
    assert f"continuing from {runs / first / 'checkpoints' / 'last.ckpt'}" in logged
    assert run_folders(tmp_path) == {first, second, third}
    assert fingerprint(runs / first)["lightning_config.yaml"] == first_files["lightning_config.yaml"]
    (change,) = [json.loads(line) for line in (runs / first / "config_changes.jsonl").read_text().splitlines()]
    assert change["changes"]["model.init_args.lr"]["now"] == 2e-3
    assert yaml.safe_load((runs / first / "lightning_config.fit-1.yaml").read_text())["model"]["init_args"]["lr"] == 2e-3


@pytest.mark.timeout(120)
def test_a_default_root_dir_that_would_not_hold_the_outputs_is_refused(tmp_path):
    from lightning_mim.cli import main

    args = fit(tmp_path, root=tmp_path / "elsewhere", run=False)
    with pytest.raises(SystemExit) as refused:  # a one-line message (SystemExit prints it without a traceback)
        main(args)
    message = str(refused.value)
    assert "--trainer.default_root_dir" in message and "--trainer.logger.init_args.save_dir" in message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


def test_differences_ignore_only_the_listed_result_neutral_settings(tmp_path):
    from lightning_mim.reliability.run_identity import (
        config_differences,
        config_path_for,
    )

    saved = {"model": {"init_args": {"lr": 1e-4}}, "trainer": {"max_epochs": 2, "enable_progress_bar": True,
                                                              "callbacks": [{"init_args": {"every_n_steps": 5}}]},
             "ckpt_path": None}
    same = {**saved, "trainer": {**saved["trainer"], "enable_progress_bar": False}, "ckpt_path": "x.ckpt"}
    assert config_differences(saved, same) == {}
    longer = {**saved, "trainer": {**saved["trainer"], "max_epochs": 3, "callbacks": []}}
    assert config_differences(saved, longer) == {"trainer.max_epochs": (2, 3), "trainer.callbacks": (None, []),
                                                 "trainer.callbacks[0].init_args.every_n_steps": (5, None)}

    # a run's first config is never overwritten; a differing one goes beside it
    (tmp_path / "lightning_config.yaml").write_text("model: {init_args: {lr: 0.0001}}\n")
    assert config_path_for(tmp_path, "fit", "model: {init_args: {lr: 0.0001}}\n") is None
    assert config_path_for(tmp_path, "test", "model: {init_args: {lr: 0.1}}\n") == tmp_path / "lightning_config.test-1.yaml"
