import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import lightning_mim.cli as cli
from lightning_mim.backbones.vit import ViT3D
from lightning_mim.heads.mae_decoder import MAEDecoder
from lightning_mim.losses.ranking import pairwise_ranking_loss, spearman_correlation
from lightning_mim.masking.random import random_mask, visible_indices
from lightning_mim.methods.selfmedhpm import SelfMedHPM

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, embed_dim=48, depth=2, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_heads=2)


def tiny_hpm(**kw) -> SelfMedHPM:
    torch.manual_seed(0)
    return SelfMedHPM(**{**TINY, **kw})


def test_step_returns_every_term_heat_maps_and_scalars():
    model = tiny_hpm()
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert set(out.losses) == {"loss", "reconstruction", "loss_prediction"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["loss"].item() == pytest.approx(out.losses["reconstruction"].item() + out.losses["loss_prediction"].item(), rel=1e-5)
    assert list(out.visuals)[0] == "input"
    assert {"heat/predicted_loss", "heat/mask"} <= set(out.visuals)
    assert all(v.shape == (2, 1, 32, 32, 32) for v in out.visuals.values())
    assert {"hard_fraction", "spearman", "ema_momentum", "mask_ratio"} <= set(out.scalars)
    # 8 tokens, kept floor(8·0.25) = 2 → 6 masked; α = 0.5 without a trainer → floor(6·0.5) = 3 hard
    assert out.scalars["mask_ratio"].item() == pytest.approx(6 / 8)
    assert out.scalars["hard_fraction"].item() == pytest.approx(3 / 6)


def test_teacher_predicted_losses_choose_the_hard_patches():
    model = tiny_hpm()
    model.capture_visuals = True
    scores = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 4.0]]).repeat(3, 1)  # top 3: tokens 1, 3, 5
    model.teacher_predicted_loss = lambda images: scores
    out = model.shared_step({"image": torch.rand(3, 1, 32, 32, 32)})
    per_token = out.visuals["heat/mask"][:, 0, ::16, ::16, ::16].reshape(3, 8)  # 0 visible, 1 random, 2 hard
    assert torch.equal(per_token[:, [1, 3, 5]], torch.full((3, 3), 2.0))
    assert per_token.gt(0).sum(dim=1).tolist() == [6, 6, 6]
    assert torch.equal(out.visuals["heat/predicted_loss"][:, 0, ::16, ::16, ::16].reshape(3, 8), scores)


def test_real_teacher_runs_on_all_tokens_without_gradients():
    model = tiny_hpm()
    images = torch.rand(2, 1, 32, 32, 32)
    scores = model.teacher_predicted_loss(images)
    assert scores.shape == (2, 8) and not scores.requires_grad
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert set(dict(model.teacher.module.named_children())) == {"encoder", "decoder", "loss_predictor"}
    model.train()
    assert not model.teacher.module.training


def test_non_relative_variant_and_loss_weight():
    images = torch.rand(2, 1, 32, 32, 32)
    torch.manual_seed(1)
    relative = tiny_hpm().shared_step({"image": images})
    torch.manual_seed(1)
    absolute = tiny_hpm(relative_loss=False, loss_predictor_weight=0.5).shared_step({"image": images})
    assert absolute.losses["loss_prediction"].item() != pytest.approx(relative.losses["loss_prediction"].item())
    expected = absolute.losses["reconstruction"].item() + 0.5 * absolute.losses["loss_prediction"].item()
    assert absolute.losses["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_schedules_follow_the_epoch():
    model = tiny_hpm(ema_ramp=0.1)
    model._trainer = SimpleNamespace(max_epochs=100, current_epoch=5)
    assert model.teacher_momentum() == pytest.approx(0.99945)  # E_r = 10 epochs
    assert model.hard_fraction() == pytest.approx(0.5 * 6 / 100)
    model._trainer = SimpleNamespace(max_epochs=100, current_epoch=99)
    assert model.teacher_momentum() == pytest.approx(0.9999)
    assert model.hard_fraction() == pytest.approx(0.5)
    fixed = tiny_hpm(ema_ramp=100, ema_ramp_unit="epochs")
    fixed._trainer = SimpleNamespace(max_epochs=800, current_epoch=50)
    assert fixed.teacher_momentum() == pytest.approx(0.99945)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="max_hard_fraction"):
        tiny_hpm(max_hard_fraction=1.5)
    with pytest.raises(ValueError, match="unit"):
        tiny_hpm(ema_ramp_unit="steps")


def teacher_fingerprint(model: SelfMedHPM) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.teacher.parameters()]).clone()


class TeacherWatcher(L.Callback):
    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append(teacher_fingerprint(pl_module))


def test_ema_updates_only_on_real_optimizer_steps_under_accumulation():
    model = tiny_hpm(lr=1e-2, warmup_epochs=0)
    initial = teacher_fingerprint(model)
    watcher = TeacherWatcher()
    data = DataLoader([{"image": torch.rand(1, 32, 32, 32)} for _ in range(4)], batch_size=1)
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[watcher])
    trainer.fit(model, data)
    s = watcher.snapshots
    assert len(s) == 4
    assert torch.equal(s[0], initial)  # batch 1: gradients accumulated, no step
    assert not torch.equal(s[1], s[0])  # batch 2: optimizer step → EMA update
    assert torch.equal(s[2], s[1])
    assert not torch.equal(s[3], s[2])
    # the update is θ_T ← m·θ_T + (1 − m)·θ_S with m = 0.999 at epoch 0
    student = torch.cat([p.detach().flatten() for p in model.student_parts().parameters()])
    assert torch.allclose(s[3], 0.999 * s[2] + 0.001 * student, atol=1e-6)


def test_loss_predictor_learns_to_rank_hard_patches():
    """Half of each volume (a random half per image) is bright and hard; the predictor only sees the visible
    patches, so it must read from them which half is bright to rank the hidden ones."""
    torch.manual_seed(0)
    grid, patch = 4, 8
    encoder = ViT3D(32, patch, 1, 48, 2, 2)
    predictor = MAEDecoder(48, (grid,) * 3, 1, 24, 1, 2)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *predictor.parameters()], lr=1e-3)

    def sample(batch):
        hard_half = torch.randint(0, 2, (batch, 1, 1, 1))
        rows = torch.arange(grid).view(1, grid, 1, 1) // (grid // 2)
        amplitude = torch.where(rows == hard_half, 1.0, 0.2).expand(batch, grid, grid, grid).float()
        voxels = amplitude.repeat_interleave(patch, 1).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        images = voxels.unsqueeze(1) + 0.05 * torch.randn(batch, 1, 32, 32, 32)
        actual = amplitude.reshape(batch, -1).square() * (1 + 0.1 * torch.randn(batch, grid**3))
        return images, actual

    def predict(images, mask):
        visible = visible_indices(mask)
        return predictor(encoder(images, visible), visible, encoder.num_prefix_tokens).squeeze(-1)

    def evaluate():
        with torch.no_grad():
            images, actual = sample(16)
            mask = random_mask(16, grid**3, 32)
            return spearman_correlation(predict(images, mask), actual, mask).mean().item()

    before = evaluate()
    for _ in range(150):
        images, actual = sample(8)
        mask = random_mask(8, grid**3, 32)
        loss = pairwise_ranking_loss(predict(images, mask), actual, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after > 0.5 and after > before + 0.3, (before, after)


def test_cli_fit_end_to_end(tmp_path, monkeypatch):
    runs = []

    class RecordingCLI(cli.MIMCLI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    monkeypatch.setattr(cli, "MIMCLI", RecordingCLI)
    cli.main([
        "fit", "--config", str(ROOT / "experiments/selfmedhpm.yaml"),
        "--config", str(ROOT / "tests/configs/selfmedhpm_tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(tmp_path / "phantoms"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ])
    trainer = runs[0].trainer
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/reconstruction_epoch", "train/loss_prediction_epoch", "train/spearman",
                 "train/hard_fraction", "train/ema_momentum"):
        assert math.isfinite(float(metrics[name])), name
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1 and list(tmp_path.rglob("panels/*.png"))
    restored = SelfMedHPM.load_from_checkpoint(checkpoints[0])
    assert torch.equal(restored.teacher.module["loss_predictor"].head.weight,
                       runs[0].model.teacher.module["loss_predictor"].head.weight)
