"""Shared checks for the methods of issue 17: one CLI fit through the real LightningCLI, bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_mim import cli

ROOT = Path(__file__).resolve().parents[1]


def cli_fit(tmp_path: Path, monkeypatch, recipe: str, tiny: str, *extra: str):
    """Fit ``experiments/<recipe>`` with ``tests/configs/<tiny>``; returns the trainer and the run folder."""
    runs = []
    monkeypatch.setattr(cli.MIMCLI, "after_fit", lambda self: runs.append(self.trainer), raising=False)
    monkeypatch.chdir(ROOT)
    cli.main([
        "fit", "--config", f"experiments/{recipe}", "--config", f"tests/configs/{tiny}",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(tmp_path / "phantoms"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
        *extra,
    ])
    (trainer,) = runs
    return trainer


def assert_fit_outputs(trainer, tmp_path: Path, names: list[str], steps: int, exported: bool = True) -> None:
    """Steps taken, every named term finite and logged, a checkpoint, a panel and (if ``exported``) the encoder."""
    assert trainer.global_step == steps
    metrics = trainer.callback_metrics
    for name in names:
        value = metrics.get(f"train/{name}_step", metrics.get(f"train/{name}"))
        assert value is not None and torch.isfinite(value), name
    assert list(tmp_path.rglob("last.ckpt"))
    assert list(tmp_path.rglob("panels/step_*.png"))
    assert bool(list(tmp_path.rglob("encoder.pt"))) == exported


def bf16_step(model, batch: dict) -> dict:
    """One training-mode step under CPU bf16 autocast; every loss term must be finite."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.shared_step(batch)
    for name, value in out.losses.items():
        assert torch.isfinite(value.float()), name
    out.losses["loss"].backward()
    return out.losses
