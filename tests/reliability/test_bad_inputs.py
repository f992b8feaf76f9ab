"""The bad-input corpus (tests/reliability/bad_inputs.py) through the real CLI, in this process.

* Every entry: ``fit`` fails before any batch reaches the training loop (a tripwire callback would
  fail the test otherwise), with a DataSourceError naming the file and the problem; problems of the
  source itself fail the same way even with ``on_bad_case: skip``.
* All case-level entries in one dataset: ONE message lists every bad case with its file and problem.
* ``on_bad_case: skip``: training runs on the good cases only, and the skipped cases are recorded
  in the data module, the run folder and the W&B config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from bad_inputs import CORPUS, BadInput, combined
from reliability_probes import REPO, read_losses

from data_modules import DataSourceError
from lightning_mim.cli import MIMCLI, close_wandb_run, main

PRETRAIN = ["--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml")]
SEGMENTATION = ["--config", str(REPO / "experiments/finetune_phantoms.yaml"),
                "--config", str(REPO / "tests/configs/finetune_tiny.yaml"),
                "--data.init_args.num_labelled", "null", "--model.init_args.num_classes", "3"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def fit_args(labels: bool, tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", *(SEGMENTATION if labels else PRETRAIN), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "run"), "--data.init_args.cache_dir",
            str(tmp_path / "cache"), *extra]


def strict_fit(labels: bool, tmp_path: Path, *extra: str) -> str:
    """Run ``fit`` that must fail before training; the error message."""
    with pytest.raises(DataSourceError) as error:
        main(fit_args(labels, tmp_path, "--trainer.logger", "false", *extra,
                      "--trainer.callbacks+=reliability_probes.TrainingTripwire"))
    assert not list(tmp_path.rglob("*.ckpt"))
    return str(error.value)


def runnable(entries: list[BadInput]) -> list[BadInput]:
    return [entry for entry in entries if not (entry.skip_as_root and AS_ROOT)]


@pytest.mark.parametrize("entry", CORPUS, ids=[entry.name for entry in CORPUS])
def test_fit_fails_before_training_naming_the_file_and_the_problem(entry, tmp_path):
    if entry.skip_as_root and AS_ROOT:
        pytest.skip("root reads a chmod-000 file anyway; unreadable inputs are covered by the folder-as-file, "
                    "dangling-symlink and FIFO entries")
    dataset = entry.build(tmp_path / "data")

    message = strict_fit(entry.labels, tmp_path, *dataset.args)

    if entry.level == "case":
        assert re.search(re.escape(f"{dataset.bad_file}: ") + entry.problem, message), message
        assert message.startswith("1 of ")  # the good cases are not blamed
    else:
        assert str(dataset.bad_file) in message and re.search(entry.problem, message), message
        skip_message = strict_fit(entry.labels, tmp_path, *dataset.args, "--data.init_args.on_bad_case", "skip")
        assert skip_message == message  # the source itself is wrong: never skipped


@pytest.mark.parametrize("labels", [False, True], ids=["images", "labels"])
def test_one_message_lists_every_bad_case_with_its_file_and_problem(labels, tmp_path):
    entries = runnable([e for e in CORPUS if e.level == "case" and e.labels == labels])
    path, built = combined(entries, tmp_path / "data")
    entries = [e for e in entries if e.name in built]
    assert len(entries) >= (5 if labels else 14)

    message = strict_fit(labels, tmp_path, "--data.init_args.datalist", str(path))

    total = len(entries) + 2 + labels  # + the good cases (and the validation case)
    assert message.startswith(f"{len(entries)} of {total} case(s) cannot be used")
    for entry in entries:
        assert f"  - {entry.name}:" in message
        assert re.search(re.escape(f"{built[entry.name].bad_file}: ") + entry.problem, message), entry.name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("labels", [False, True], ids=["images", "labels"])
def test_skip_trains_on_the_good_cases_and_records_what_was_skipped(labels, tmp_path):
    entries = runnable([e for e in CORPUS if e.level == "case" and e.labels == labels])
    path, built = combined(entries, tmp_path / "data")
    entries = [e for e in entries if e.name in built]
    losses = tmp_path / "losses.jsonl"

    cli = MIMCLI(args=fit_args(labels, tmp_path, "--data.init_args.datalist", str(path),
                               "--data.init_args.on_bad_case", "skip", "--trainer.max_epochs", "1",
                               "--trainer.callbacks+=reliability_probes.LossRecorder",
                               "--trainer.callbacks.init_args.path", str(losses)))
    wandb_config = dict(cli.trainer.logger.experiment.config)
    close_wandb_run()

    skipped = cli.datamodule.skipped_cases
    assert sorted(item["case_id"] for item in skipped) == sorted(entry.name for entry in entries)
    assert all(item["problems"] for item in skipped)
    seen = {case for line in losses.read_text().splitlines() for case in json.loads(line)["case_id"]}
    assert read_losses(losses) and seen <= {"good_0", "good_1"}
    run = Path(cli.trainer.logger.run_dir)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0
    assert json.loads((run / "skipped_cases.json").read_text()) == skipped
    assert wandb_config["skipped_cases"] == skipped
