"""DINOv2-3D: block masks, Sinkhorn-Knopp, KoLeo and iBOT by hand, mask-token order, teacher, export, bf16, CLI."""

import math

import pytest
import torch
from monai.networks.nets import UNETR

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.backbones.masked_vit import MaskedViT3D
from lightning_mim.losses.dinov2 import ibot_patch_loss, koleo_loss, sinkhorn_knopp
from lightning_mim.masking.block import block_mask, dinov2_masks
from lightning_mim.methods.dinov2 import DINOv2
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(img_size=32, local_size=16, num_local_crops=2, patch_size=8, embed_dim=24, depth=2, num_heads=2,
            out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)


def test_koleo_on_three_points_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # nearest neighbours: 0→1 (√0.8), 1→2 (√0.4), 2→1 (√0.4)
    expected = -(math.log(math.sqrt(0.8)) + 2 * math.log(math.sqrt(0.4))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)
    assert koleo_loss(x * 5).item() == pytest.approx(expected, rel=1e-5)  # scale-free (normalised first)


def test_sinkhorn_knopp_is_doubly_stochastic():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, 0.5, iterations=50)
    torch.testing.assert_close(q.sum(1), torch.ones(6))  # one distribution per sample
    torch.testing.assert_close(q.sum(0), torch.full((4,), 6 / 4))  # prototypes used equally
    q3 = sinkhorn_knopp(logits, 0.5)  # 3 iterations: rows exact, columns close
    torch.testing.assert_close(q3.sum(1), torch.ones(6))
    assert (q3.sum(0) - 1.5).abs().max() < 0.2


def test_block_mask_reaches_about_its_target_with_boxes_smaller_than_the_grid():
    g = torch.Generator().manual_seed(0)
    mask = block_mask((6, 6, 6), 60, g, max_volume=108)
    assert 40 <= int(mask.sum()) <= 60
    assert int(block_mask((6, 6, 6), 0, g).sum()) == 0


def test_dinov2_masks_half_the_crops_with_stratified_ratios():
    g = torch.Generator().manual_seed(1)
    masks = dinov2_masks(8, (6, 6, 6), 0.5, (0.1, 0.5), g)
    counts = masks.sum(1)
    assert masks.shape == (8, 216) and int((counts == 0).sum()) >= 4
    assert counts.max() <= 0.5 * 216


def test_ibot_loss_weights_each_image_by_its_masked_count():
    student = torch.zeros(2, 3, 2)  # uniform student: CE = log 2 per token
    teacher = torch.full((2, 3, 2), 0.5)
    masks = torch.tensor([[True, False, False], [True, True, True]])
    # image 0: 1 token × log2 / 1; image 1: 3 tokens × log2 / 3; divided by 2 images
    assert ibot_patch_loss(student, teacher, masks).item() == pytest.approx(math.log(2), rel=1e-6)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert ibot_patch_loss(student, teacher, none).item() == 0.0


def test_mask_token_is_placed_before_positions_and_local_crops_get_resized_positions():
    vit = MaskedViT3D(32, 8, 1, 24, 1, 2).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :2] = True
    tokens = vit.patch_embed(x)
    tokens = torch.where(mask.unsqueeze(-1), vit.mask_token, tokens) + vit.pos_embed
    first_block_input = torch.cat([vit.cls_token, tokens], 1)
    captured = []
    vit.blocks[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    vit(x, mask)
    torch.testing.assert_close(captured[0], first_block_input)
    assert not torch.allclose(captured[0][0, 1], captured[0][0, 2])  # same token, different positions
    assert vit(torch.rand(2, 1, 16, 16, 16)).shape == (2, 1 + 8, 24)


def test_step_terms_weights_teacher_and_gradients():
    torch.manual_seed(0)
    model = DINOv2(**TINY, koleo_weight=0.5)
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(3, 1, 32, 32, 32)})
    losses = out.losses
    torch.testing.assert_close(losses["loss"].detach(), losses["dino"] + losses["ibot"] + 0.5 * losses["koleo"])
    assert list(out.visuals) == ["global1", "global2", "masked_global", "heat/mask", "local1"]
    losses["loss"].backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert not any("mask_token" in n for n, _ in model.teacher.named_parameters())
    assert not model.teacher.module.training
    model.train()
    assert not model.teacher.module.training  # stays in eval when the module is put in train mode


def test_sinkhorn_variant_and_centres_only_move_with_centering():
    model = DINOv2(**TINY, centering="sinkhorn_knopp")
    out = model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert torch.isfinite(out.losses["loss"]) and torch.all(model.dino_criterion.center == 0)
    centred = DINOv2(**TINY)
    centred.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert not torch.all(centred.dino_criterion.center == 0)


def test_export_into_unetr_strictly_and_a_clear_error_when_unetr_cannot_hold_it():
    with pytest.raises(ValueError, match="UNETR"):
        DINOv2(**TINY).export_encoder()
    model = DINOv2(**{**TINY, "patch_size": 16, "depth": 12, "local_size": 16})
    export = model.export_encoder()
    kwargs = dict(export.network_kwargs)
    assert kwargs.pop("num_layers") == 12  # 12 blocks: MONAI's own UNETR takes it
    net = UNETR(out_channels=2, **kwargs)
    net.vit.load_state_dict({k.removeprefix("vit."): v for k, v in export.state_dict.items()}, strict=True)
    assert not any("mask_token" in k for k in export.state_dict)


def test_bf16_autocast_step():
    bf16_step(DINOv2(**TINY), {"image": torch.rand(2, 1, 32, 32, 32)})


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "dinov2.yaml", "dinov2_tiny.yaml")
    # the tiny 2-block ViT cannot be held by UNETR: the run warns and writes no encoder (export tested above)
    assert_fit_outputs(trainer, tmp_path, ["loss", "dino", "ibot", "koleo", "teacher_momentum", "teacher_entropy"],
                       steps=2, exported=False)


def test_targets_and_patch_centre_accept_a_rank_without_masked_tokens():
    assert sinkhorn_knopp(torch.zeros(0, 4), 0.1).shape == (0, 4)
    model = DINOv2(**TINY)
    before = model.ibot_criterion.center.clone()
    model.update_patch_center(torch.zeros(0, 64))
    assert torch.equal(model.ibot_criterion.center, before)
    model.update_patch_center(torch.ones(3, 64))
    torch.testing.assert_close(model.ibot_criterion.center, torch.full((64,), 0.1))
