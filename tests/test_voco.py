"""VoCo: overlap labels and losses on hand-computed cases, teacher variants, strict SwinUNETR export, bf16, CLI."""

import math

import pytest
import torch
from monai.networks.nets import SwinUNETR

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.backbones.compositions import residual_block
from lightning_mim.losses.voco import (
    base_crop_starts,
    online_assign,
    orthogonality_loss,
    overlap_labels,
    position_loss,
)
from lightning_mim.methods.voco import VoCo
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(crop_size=64, grid=(2, 1, 1), num_random_crops=1, feature_size=6, depths=[1, 1, 1, 1], window_size=4,
            projector_hidden_dim=32, projector_dim=16)


def test_known_overlap_label():
    # 2 × 2 × 1 grid of 4³ crops; a random crop starting at (2, 1, 0) covers x [2, 6), y [1, 5)
    assert base_crop_starts((2, 2, 1), (4, 4, 4)).tolist() == [[0, 0, 0], [0, 4, 0], [4, 0, 0], [4, 4, 0]]
    y = overlap_labels(torch.tensor([[2, 1, 0]]), (2, 2, 1), (4, 4, 4))
    torch.testing.assert_close(y, torch.tensor([[0.5 * 0.75, 0.5 * 0.25, 0.5 * 0.75, 0.5 * 0.25]]))
    # on a base crop exactly: a one-hot label; in z-tiled grids the overlap is volumetric
    assert overlap_labels(torch.tensor([[4, 0, 0]]), (2, 2, 1), (4, 4, 4)).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert overlap_labels(torch.tensor([[0, 0, 2]]), (1, 1, 2), (4, 4, 4)).tolist() == [[0.5, 0.5]]


def test_position_and_negative_terms_by_hand():
    s = torch.tensor([[0.5, 0.2, 0.0]])
    y = torch.tensor([[0.75, 0.25, 0.0]])
    pos, neg = position_loss(s, y, "square")
    expected_pos = (0.75 * -math.log(1 - 0.25 + 1e-6) + 0.25 * -math.log(1 - 0.05 + 1e-6)) / (1 + 1e-6)
    assert pos.item() == pytest.approx(expected_pos, rel=1e-5) and neg.item() == pytest.approx(0.0)
    s2 = torch.tensor([[0.5, 0.2, 0.4]])
    assert position_loss(s2, y, "square")[1].item() == pytest.approx(0.16 / (1 + 1e-6), rel=1e-5)
    assert position_loss(s2, y, "log")[1].item() == pytest.approx(-math.log(0.6 + 1e-6) / (1 + 1e-6), rel=1e-5)


def test_assignment_clips_negative_cosines_and_orthogonality_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(online_assign(z, q), torch.tensor([[1 / math.sqrt(2), 0.0, 0.0]]))
    # pairs (0,1): cos −0.707 → 0; (0,2): 0.707² = 0.5; (1,2): 0 → mean over 3 pairs = 1/6
    assert orthogonality_loss(q).item() == pytest.approx(1 / 6, rel=1e-5)
    q.requires_grad_(True)
    orthogonality_loss(q).backward()
    assert q.grad[2].abs().sum() == 0  # the later crop of each pair is stop-gradient, crop 2 is never first


@pytest.mark.parametrize("teacher,inter", [("projector", True), ("full", False), ("none", False)])
def test_teacher_variants_train_and_move_the_teacher(teacher, inter):
    torch.manual_seed(0)
    model = VoCo(**TINY, teacher=teacher, inter_volume=inter)
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(2, 1, 128, 64, 64)})
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert ("inter_volume" in out.losses) == inter
    assert list(out.visuals) == ["region", "heat/random_crop_and_grid", "random_crop", "best_base_crop"]
    out.losses["loss"].backward()
    assert model.backbone.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0
    if model.teacher is not None:
        assert all(p.grad is None for p in model.teacher.parameters())
        before = [p.clone() for p in model.teacher.parameters()]
        with torch.no_grad():
            for p in model.projector.parameters():
                p.add_(1.0)
        model.after_optimizer_step()
        moved = [torch.allclose(a, b) for a, b in zip(before, model.teacher.parameters())]
        assert not all(moved)


def test_crop_sampler_targets_match_the_cut_crops():
    model = VoCo(**{**TINY, "flip_prob": 0.0, "rotate_prob": 0.0, "shift_prob": 0.0})
    regions = torch.arange(128 * 64 * 64, dtype=torch.float32).view(1, 1, 128, 64, 64)
    crops, starts, targets = model.sample_crops(regions, torch.Generator().manual_seed(0))
    a = starts[0, 0, 0].item()
    assert crops.shape == (3, 1, 64, 64, 64) and torch.equal(crops[0], regions[0, :, a : a + 64])
    assert torch.equal(crops[2], regions[0, :, 64:])
    torch.testing.assert_close(targets[0, 0], torch.tensor([(64 - a) / 64, a / 64]))


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="inter_volume false"):
        VoCo(**TINY, teacher="none")
    with pytest.raises(ValueError, match="at least 2 base crops"):
        VoCo(**{**TINY, "grid": (1, 1, 1)})
    with pytest.raises(ValueError, match="divisible by"):
        VoCo(**{**TINY, "crop_size": 48})


def test_one_voxel_maps_take_the_exact_instance_norm_limit():
    # Instance norm by its formula, (x - mean) / sqrt(var + eps), is 0 on one voxel where torch refuses to run it.
    class FormulaNorm(torch.nn.Module):
        def forward(self, x):
            mean, var = x.mean((2, 3, 4), keepdim=True), x.var((2, 3, 4), unbiased=False, keepdim=True)
            return (x - mean) / torch.sqrt(var + 1e-5)

    from monai.networks.blocks import UnetrBasicBlock

    torch.manual_seed(0)
    for width_in in (8, 1):  # identity shortcut (encoder10) and a conv shortcut (encoder1)
        block = UnetrBasicBlock(3, width_in, 8, kernel_size=3, stride=1, norm_name="instance", res_block=True)
        for name in ("norm1", "norm2", "norm3"):
            if hasattr(block.layer, name):
                setattr(block.layer, name, FormulaNorm())
        x = torch.randn(2, width_in, 1, 1, 1)
        expected = block(x.clone())
        torch.testing.assert_close(residual_block(block, x), expected)
        assert (expected == 0).all() if width_in == 1 else torch.equal(expected, torch.nn.functional.leaky_relu(x, 0.01))
        big = torch.randn(2, width_in, 4, 4, 4)
        torch.testing.assert_close(residual_block(block, big), block(big))


def test_32_voxel_crops_train_with_a_one_voxel_bottleneck():
    model = VoCo(**{**TINY, "crop_size": 32})
    out = model.shared_step({"image": torch.rand(2, 1, 64, 32, 32)})
    out.losses["loss"].backward()
    assert torch.isfinite(out.losses["loss"]) and model.backbone.encoder4.layer.conv1.conv.weight.grad.abs().sum() > 0
    assert model.backbone.encoder10.layer.conv1.conv.weight.grad is None  # the one-voxel block only passes its input on


def test_export_loads_strictly_into_swinunetr_encoders():
    model = VoCo(**{**TINY, "feature_size": 12})
    export = model.export_encoder()
    net = SwinUNETR(out_channels=3, **export.network_kwargs)
    result = net.load_state_dict(export.state_dict, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("decoder", "out.")) for k in result.missing_keys)
    assert torch.equal(net.encoder10.layer.conv1.conv.weight, model.backbone.encoder10.layer.conv1.conv.weight)


def test_bf16_autocast_step():
    bf16_step(VoCo(**{**TINY, "crop_size": 32}, inter_volume=False), {"image": torch.rand(1, 1, 64, 32, 32)})


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "voco.yaml", "voco_tiny.yaml")
    assert_fit_outputs(trainer, tmp_path, ["loss", "position", "negative", "regularization", "inter_volume"], steps=2)


def test_fine_tuning_loader_takes_the_pretrained_encoder_blocks():
    from lightning_mim.segmentation.networks import build_network
    from lightning_mim.segmentation.weights import export_module, load_pretrained

    model = VoCo(**{**TINY, "feature_size": 12})
    file = export_module(model)
    kwargs = {k: v for k, v in file.network_kwargs.items() if k != "in_channels"}
    network = build_network("swin_unetr", 1, 3, 64, **kwargs)
    report = load_pretrained(network, file, log=None)
    assert "encoder10.layer.conv1.conv.weight" in report.loaded and not report.unexpected
    assert torch.equal(network.encoder1.layer.conv1.conv.weight, model.backbone.encoder1.layer.conv1.conv.weight)
