import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lightning_mim.cli as cli
from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.losses.reconstruction import normalize_patches
from lightning_mim.masking.grid import patchify
from lightning_mim.masking.random import random_mask
from lightning_mim.methods.anatomask import AnatoMask

ROOT = Path(__file__).resolve().parents[1]
DIMS = (8, 16, 32, 64, 128)


def tiny_anatomask(**kw) -> AnatoMask:
    torch.manual_seed(0)
    return AnatoMask(**{"img_size": 32, "encoder_dims": DIMS, **kw})


def test_defaults_are_stunet_b_on_the_nnunet_patch():
    model = AnatoMask()
    assert model.network.encoder.feature_channels() == (32, 64, 128, 256, 512)
    assert model.grid == (7, 7, 8) and model.num_cells == 392
    assert model.num_masked == 235  # kept round(392·0.4) = 157
    assert model.network.decoder.block_widths == (512, 256, 128, 64)
    assert isinstance(model.network.densify.projections[0], torch.nn.Identity)


def test_step_returns_loss_heat_maps_and_scalars():
    model = tiny_anatomask()
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert set(out.losses) == {"loss", "reconstruction"} and torch.isfinite(out.losses["loss"])
    assert list(out.visuals)[0] == "input"
    assert {"heat/teacher_loss", "heat/mask", "masked", "reconstruction"} <= set(out.visuals)
    assert all(v.shape == (2, 1, 32, 32, 32) for v in out.visuals.values())
    # 8 cells, kept round(8·0.4) = 3 → 5 masked; r = 0.5 without a trainer → floor(5·0.5) = 2 hard
    assert out.scalars["mask_ratio"].item() == pytest.approx(5 / 8)
    assert out.scalars["hard_fraction"].item() == pytest.approx(2 / 5)
    assert -1.0 <= out.scalars["spearman"].item() <= 1.0
    out.losses["loss"].backward()
    assert model.network.densify.mask_tokens[1].grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_loss_map_scores_only_the_initially_masked_patches():
    model = tiny_anatomask()
    images = torch.rand(2, 1, 32, 32, 32)
    target = patchify(images, 16)
    initial = random_mask(2, 8, model.num_masked)
    scores = model.teacher_loss_map(images, target, initial)
    assert scores.shape == (2, 8) and not scores.requires_grad
    assert bool((scores[~initial] == 0).all()) and bool((scores[initial] > 0).all())
    # the default compares with the normalised target, as the student's loss does
    pred = patchify(model.teacher(images, initial.reshape(2, 2, 2, 2)), 16)
    expected = (pred - normalize_patches(target)).square().mean(-1) * initial
    assert torch.allclose(scores, expected, atol=1e-5)
    raw = tiny_anatomask(teacher_raw_target=True)
    raw_scores = raw.teacher_loss_map(images, target, initial)
    assert torch.allclose(raw_scores, (pred - target).square().mean(-1) * initial, atol=1e-5)


def test_guided_mask_takes_the_teacher_hardest_patches():
    model = tiny_anatomask()
    model.capture_visuals = True
    scores = torch.tensor([[5.0, 0.0, 0.0, 9.0, 0.0, 0.0, 1.0, 0.0]]).repeat(4, 1)
    model.teacher_loss_map = lambda images, target, initial: scores
    out = model.shared_step({"image": torch.rand(4, 1, 32, 32, 32)})
    per_cell = out.visuals["heat/mask"][:, 0, ::16, ::16, ::16].reshape(4, 8)  # 0 visible, 1 random, 2 hard
    assert torch.equal(per_cell[:, [0, 3]], torch.full((4, 2), 2.0))
    assert per_cell.gt(0).sum(dim=1).tolist() == [5] * 4


def test_schedules_follow_the_epoch():
    model = tiny_anatomask()
    model._trainer = SimpleNamespace(max_epochs=1000, current_epoch=125)
    assert model.teacher_momentum() == pytest.approx(0.99945)  # ramp over E/4 = 250 epochs
    assert model.hard_fraction() == pytest.approx(0.5 * 126 / 999)
    model._trainer = SimpleNamespace(max_epochs=1000, current_epoch=0)
    assert model.hard_fraction() * model.num_masked < 1  # epoch 0: fully random masks


def test_input_sizes_must_align_with_the_downsample_ratio():
    with pytest.raises(ValueError, match="divisible by the encoder's downsample ratio 16"):
        AnatoMask(img_size=(112, 112, 120), encoder_dims=DIMS)
    model = tiny_anatomask()
    with pytest.raises(ValueError, match="built for inputs"):
        model.shared_step({"image": torch.rand(1, 1, 48, 32, 32)})


def test_teacher_follows_the_student_after_an_optimizer_step():
    model = tiny_anatomask()
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.network.parameters():
            p.add_(1.0)
    model.after_optimizer_step()  # no trainer: epoch 0, m = 0.999
    for old, new in zip(before, model.teacher.parameters()):
        assert torch.allclose(new, old + 0.001, atol=1e-6)


def test_export_loads_strictly_into_a_dense_encoder():
    model = tiny_anatomask()
    export = model.export_encoder()
    assert export.target == "stunet_encoder"
    assert export.network_kwargs == {"in_channels": 1, "dims": list(DIMS), "depths": [1] * 5}
    dense = STUNetEncoder(**export.network_kwargs)
    dense.load_state_dict(export.state_dict, strict=True)
    x = torch.rand(1, 1, 32, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(dense(x), model.network.encoder.encoder(x)))
    assert export.metadata["mask_cell"] == 16 and export.metadata["roi_size"] == [32, 32, 32]


def test_cli_fit_end_to_end(tmp_path, monkeypatch):
    runs = []

    class RecordingCLI(cli.MIMCLI):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    monkeypatch.setattr(cli, "MIMCLI", RecordingCLI)
    cli.main([
        "fit", "--config", str(ROOT / "experiments/anatomask.yaml"),
        "--config", str(ROOT / "tests/configs/anatomask_tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(tmp_path / "phantoms"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
        # A step budget under a long max_epochs (as the study runs): the per-epoch schedules span the 2 epochs run.
        "--trainer.max_epochs", "1000", "--trainer.max_steps", "4",
    ])
    trainer = runs[0].trainer
    assert trainer.global_step == 4 and trainer.current_epoch == 2 and trainer.gradient_clip_val == 12.0
    assert runs[0].model.planned_epochs() == 2
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/spearman", "train/hard_fraction", "train/ema_momentum"):
        assert math.isfinite(float(metrics[name])), name
    # Last epoch of 2: α = 0.5 (AnatoMask's schedule, capped), so hard cells are chosen; over 1000 planned
    # epochs α would be 0.001 and every mask random.
    assert float(metrics["train/hard_fraction"]) > 0
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1 and list(tmp_path.rglob("panels/*.png"))
    restored = AnatoMask.load_from_checkpoint(checkpoints[0])
    assert restored.img_size == (32, 32, 32)
    head = restored.network.decoder.head.weight
    assert torch.equal(head, runs[0].model.network.decoder.head.weight)
