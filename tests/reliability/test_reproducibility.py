"""The same command with the same seed gives bit-identical results on the same machine.

A short pre-train -> fine-tune -> test chain, run twice into separate output folders through the
real CLI: the exported encoder, the fine-tuned weights and every test metric must be equal bit for
bit (not approximately). Across machines they are not: see README "Reproducibility".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import wandb
from reliability_probes import REPO

from lightning_mim.cli import main
from lightning_mim.segmentation.module import TEST_CSV
from lightning_mim.segmentation.weights import read_encoder_file

CONFIGS = REPO / "tests" / "configs"
CALLBACKS = ("--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}},"
             " {class_path: lightning_mim.callbacks.export.EncoderExport}]")


def chain(out: Path, data: Path) -> dict[str, object]:
    """Pre-train MAE-3D (12 blocks so UNETR can take the encoder, 2 steps), fine-tune 4 steps, test."""
    pre = ["fit", "--config", str(REPO / "experiments/mae.yaml"), "--config", str(CONFIGS / "mae_tiny.yaml"), CALLBACKS,
           "--model.init_args.depth", "12", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
           "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
           "--trainer.logger.init_args.save_dir", str(out / "pre"), "--trainer.logger.init_args.id", "pre",
           "--data.init_args.phantom_root", str(data / "phantoms"), "--data.init_args.cache_dir", str(data / "cache")]
    assert main(pre) == 0
    wandb.finish()
    encoder = out / "pre" / "lightning-mim" / "pre" / "encoder.pt"
    tune = ["--config", str(REPO / "experiments/finetune_phantoms.yaml"), "--config", str(CONFIGS / "finetune_tiny.yaml"),
            "--model.init_args.pretrained", str(encoder), "--trainer.logger.init_args.save_dir", str(out / "tune"),
            "--trainer.logger.init_args.id", "tune", "--data.init_args.phantom_root", str(data / "phantoms"),
            "--data.init_args.cache_dir", str(data / "cache")]
    assert main(["fit", *tune]) == 0
    wandb.finish()
    run = out / "tune" / "lightning-mim" / "tune"
    assert main(["test", *tune, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    wandb.finish()
    weights = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key, value in sorted(read_encoder_file(encoder).state_dict.items()):
        digest.update(key.encode() + value.numpy().tobytes())
    return {"encoder": digest.hexdigest(), "weights": weights, "metrics": (run / TEST_CSV).read_text()}


@pytest.mark.timeout(900)
def test_pretrain_finetune_test_chain_is_bit_identical_when_run_twice(tmp_path):
    first, second = chain(tmp_path / "first", tmp_path), chain(tmp_path / "second", tmp_path)
    assert first["encoder"] == second["encoder"]
    assert first["weights"].keys() == second["weights"].keys()
    for key, value in first["weights"].items():
        assert torch.equal(value, second["weights"][key]), key
    assert first["metrics"] == second["metrics"] and first["metrics"].count("\n") > 2
