"""Attempts of one run never share a W&B offline folder, even when they start within the same second."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime

import wandb
from reliability_probes import logged_steps

from lightning_mim.loggers import MIMWandbLogger


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_an_attempt_started_in_the_same_second_gets_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = MIMWandbLogger(save_dir=str(tmp_path), id="samesecond")
    first.log_metrics({"train/loss_step": 1.0}, step=0)
    wandb.finish()
    wandb.teardown()  # waits for W&B's writer process to exit: the attempt's files are complete
    (folder,) = (tmp_path / "wandb").glob("offline-run-*-samesecond")
    # the first attempt as if it had started this very second: the next one starts within it
    same_second = folder.with_name(f"offline-run-{datetime.fromtimestamp(time.time()):%Y%m%d_%H%M%S}-samesecond")
    folder.rename(same_second)
    before = digest(same_second)

    second = MIMWandbLogger(save_dir=str(tmp_path), id="samesecond")
    second.log_metrics({"train/loss_step": 2.0}, step=1)
    wandb.finish()
    wandb.teardown()

    folders = sorted((tmp_path / "wandb").glob("offline-run-*-samesecond*"))
    assert len(folders) == 2 and same_second in folders, folders
    assert digest(same_second) == before  # the first attempt's files are untouched
    (other,) = set(folders) - {same_second}
    assert logged_steps(same_second, "train/loss_step") == ("samesecond", [0])
    assert logged_steps(other, "train/loss_step") == ("samesecond", [1])  # one run id: wandb sync makes one run
