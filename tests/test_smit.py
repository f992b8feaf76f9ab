"""SMIT: loss wiring, teacher behaviour, schedules through a real Trainer, export, end-to-end CLI."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch.utils.data import DataLoader, Dataset

import data_modules  # noqa: F401  (import the package before the CLI changes directory to the config's)
import lightning_mim.methods.smit as smit_module
from lightning_mim import cli
from lightning_mim.losses.distillation import cross_view_distillation, masked_token_distillation
from lightning_mim.losses.reconstruction import masked_voxel_l1
from lightning_mim.masking.grid import flatten_mask, voxel_mask
from lightning_mim.methods.smit import SMIT
from lightning_mim.schedules import cosine_momentum

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, feature_size=12, depths=[1, 1, 1, 1], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)


def tiny_smit(**kw) -> SMIT:
    return SMIT(**{**TINY, **kw})


def views_batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(b, 2, 1, 32, 32, 32, generator=g)
    return {"image": views[:, 0], "views": views}


def test_step_returns_every_term_weighted_as_configured():
    model = tiny_smit(mip_weight=1.0, patch_weight=0.3, cls_weight=0.2)
    model.capture_visuals = True
    out = model.shared_step(views_batch())
    losses = out.losses
    assert set(losses) == {"loss", "mip", "patch_distill", "cls_distill"}
    assert all(torch.isfinite(v) for v in losses.values())
    expected = losses["mip"] + 0.3 * losses["patch_distill"] + 0.2 * losses["cls_distill"]
    torch.testing.assert_close(losses["loss"].detach(), expected)
    assert {"teacher_momentum", "teacher_temp_cls", "teacher_temp_patch", "teacher_cls_entropy",
            "teacher_cls_kl_uniform"} <= set(out.scalars)
    assert list(out.visuals) == ["input", "masked_view1", "masked_view2", "reconstruction"]
    assert out.scalars["mask_ratio"].item() == pytest.approx(math.ceil(0.7 * 8) / 8)


def test_losses_match_a_manual_composition(monkeypatch):
    """Same-view MPD on masked tap tokens, cross-view ITD, MIP on masked voxels — each view its own mask."""
    model = tiny_smit().eval()
    masks = torch.zeros(4, 2, 2, 2, dtype=torch.bool)
    masks.view(4, -1)[:, :6] = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 1]],
                                            dtype=torch.bool)
    monkeypatch.setattr(smit_module, "random_cell_mask", lambda n, grid, ratio, device=None: masks[:n])
    batch = views_batch()
    out = model.shared_step(batch)
    stacked = torch.cat([batch["views"][:, 0], batch["views"][:, 1]])
    with torch.no_grad():
        teacher = model.teacher(stacked)
        student = model.student(stacked, model.encoder.token_mask(masks))
        t_cls, t_patch = model.teacher_temperatures(0)
        probs_cls = model.cls_criterion.teacher_probs(teacher.cls_logits, t_cls).view(2, 2, -1)
        probs_patch = model.patch_criterion.teacher_probs(teacher.patch_logits, t_patch).view(2, 2, 8, -1)
        mpd = masked_token_distillation(model.patch_criterion, student.patch_logits.view(2, 2, 8, -1), probs_patch,
                                        flatten_mask(masks).view(2, 2, 8))
        itd = cross_view_distillation(model.cls_criterion, student.cls_logits.view(2, 2, -1), probs_cls)
        mip = masked_voxel_l1(model.mip_head(student.bottleneck), stacked, voxel_mask(masks, 16))
    torch.testing.assert_close(out.losses["patch_distill"], mpd)
    torch.testing.assert_close(out.losses["cls_distill"], itd)
    torch.testing.assert_close(out.losses["mip"], mip)
    # and masks really are per view: view-swapped masks give a different MPD
    swapped = masked_token_distillation(model.patch_criterion, student.patch_logits.view(2, 2, 8, -1), probs_patch,
                                        flatten_mask(masks).view(2, 2, 8).flip(0))
    assert not torch.allclose(swapped, mpd)


def test_teacher_sees_unmasked_views_owns_no_mask_token_and_gets_no_gradient():
    model = tiny_smit()
    seen = []
    original = model.teacher.module.encoder.embed
    model.teacher.module.encoder.embed = lambda x, token_mask=None: seen.append(token_mask) or original(x, token_mask)
    out = model.shared_step(views_batch())
    out.losses["loss"].backward()
    assert seen == [None]
    assert not any("mask_token" in name for name, _ in model.teacher.named_parameters())
    assert model.encoder.mask_token is not None and model.encoder.mask_token.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    optimised = {id(p) for group in model.parameter_groups() for p in group["params"]}
    assert not optimised & {id(p) for p in model.teacher.parameters()}


def test_centres_move_in_training_only():
    model = tiny_smit()
    model.eval()
    model.shared_step(views_batch())
    assert torch.all(model.cls_criterion.center == 0) and torch.all(model.patch_criterion.center == 0)
    model.train()
    batch = views_batch()
    model.shared_step(batch)
    stacked = torch.cat([batch["views"][:, 0], batch["views"][:, 1]])
    with torch.no_grad():
        teacher = model.teacher(stacked)
    torch.testing.assert_close(model.cls_criterion.center, 0.1 * teacher.cls_logits.mean(dim=0))
    torch.testing.assert_close(model.patch_criterion.center, 0.1 * teacher.patch_logits.mean(dim=(0, 1)))


def test_one_sided_variant_masks_and_students_view_u_only():
    model = tiny_smit(symmetric_views=False)
    model.capture_visuals = True
    sizes = []
    original = model.student.forward
    model.student.forward = lambda images, token_mask=None: sizes.append(images.shape[0]) or original(images, token_mask)
    out = model.shared_step(views_batch(b=3))
    assert sizes == [3]
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert list(out.visuals) == ["input", "masked_view1", "view2", "reconstruction"]


def test_shared_head_uses_one_head():
    shared, separate = tiny_smit(shared_head=True), tiny_smit()
    assert shared.student.patch_head is None and len(shared.student.heads()) == 1
    assert len(separate.student.heads()) == 2
    assert sum(p.numel() for p in separate.student.parameters()) > sum(p.numel() for p in shared.student.parameters())
    assert torch.isfinite(shared.shared_step(views_batch()).losses["loss"])


def test_teacher_temperature_schedules():
    model = tiny_smit()
    assert model.teacher_temperatures(0) == pytest.approx((0.04, 0.04))
    assert model.teacher_temperatures(29) == pytest.approx((0.07, 0.04))
    assert model.teacher_temperatures(30) == pytest.approx((0.07, 0.04))
    assert model.teacher_temperatures(59) == pytest.approx((0.07, 0.07))
    assert model.teacher_temperatures(499) == pytest.approx((0.07, 0.07))


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="tap stride"):
        tiny_smit(mask_cell=8)
    with pytest.raises(ValueError, match="mask ratio"):
        tiny_smit(mask_ratio=1.0)
    with pytest.raises(ValueError, match="momentum"):
        tiny_smit(momentum_start=1.0, momentum_end=0.99)
    with pytest.raises(ValueError, match="batch\\['views'\\]"):
        tiny_smit().shared_step({"image": torch.rand(2, 1, 32, 32, 32)})


def test_export_loads_into_monai_swinunetr_with_smit_layout():
    model = tiny_smit()
    export = model.export_encoder()
    assert export.target == "swin_unetr"
    kw = export.network_kwargs
    assert (kw["num_heads"], kw["window_size"], kw["qkv_bias"], kw["patch_norm"], kw["feature_size"]) == (
        [4, 4, 4, 4], 4, False, True, 12)
    assert not any("mask_token" in k for k in export.state_dict)
    net = SwinUNETR(out_channels=2, **kw)
    missing, unexpected = net.load_state_dict(export.state_dict, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)
    for name, value in model.encoder.state_dict().items():
        if name != "mask_token":
            assert torch.equal(net.swinViT.state_dict()[name], value)


class ViewDataset(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        views = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(index))
        return {"image": views[0], "views": views}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_momentum_follows_global_step_across_epochs_and_last_layer_frozen_in_epoch_0(accumulate):
    L.seed_everything(0)
    model = tiny_smit(freeze_last_layer_epochs=1, warmup_epochs=0)
    used = []
    update = model.teacher.update

    def record(student, momentum):
        used.append((model.global_step, momentum))
        update(student, momentum)

    model.teacher.update = record
    last_layer = model.student.cls_head.last_layer.parametrizations.weight.original1
    snapshots = [last_layer.detach().clone()]
    embed = model.encoder.patch_embed.proj.weight
    embeds = [embed.detach().clone()]

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(last_layer.detach().clone())
            embeds.append(embed.detach().clone())

    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accumulate_grad_batches=accumulate, callbacks=[Snapshot()])
    trainer.fit(model, DataLoader(ViewDataset(), batch_size=2))
    total = trainer.estimated_stepping_batches
    assert total == 6 // accumulate
    assert [step for step, _ in used] == list(range(total))  # one update per real step, no per-epoch restart
    assert used[0][1] == pytest.approx(0.996)
    assert [m for _, m in used] == pytest.approx([cosine_momentum(k, total) for k in range(total)])
    assert model.global_step == total and model.teacher_momentum() == pytest.approx(1.0)
    assert torch.equal(snapshots[1], snapshots[0])  # epoch 0: last layer frozen
    assert not torch.equal(snapshots[2], snapshots[1])  # epoch 1: trained
    assert not torch.equal(embeds[1], embeds[0])  # the rest trains from the start


def test_cli_end_to_end(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(cli.MIMCLI, "after_fit", lambda self: runs.append(self.trainer), raising=False)
    monkeypatch.chdir(ROOT)
    cli.main([
        "fit", "--config", "experiments/smit.yaml", "--config", "tests/configs/smit_tiny.yaml",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(tmp_path / "phantoms"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ])
    (trainer,) = runs
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    for name in ("loss", "mip", "patch_distill", "cls_distill", "teacher_momentum", "teacher_temp_cls",
                 "teacher_temp_patch", "teacher_cls_entropy", "teacher_cls_kl_uniform"):
        value = metrics.get(f"train/{name}_step", metrics.get(f"train/{name}"))
        assert value is not None and torch.isfinite(value), name
    assert "val/loss" in metrics and torch.isfinite(metrics["val/loss"])
    assert list(tmp_path.rglob("last.ckpt"))
    assert list(tmp_path.rglob("panels/step_*.png"))
