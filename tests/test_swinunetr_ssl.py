"""Swin UNETR SSL: rotation labels, cutout, head shapes, loss wiring, strict swinViT export, bf16, CLI fit."""

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.corruption.swin_ssl import cutout, drop_boxes, rotate90
from lightning_mim.heads.upsample import VAEUpsampleHead
from lightning_mim.losses.contrastive import nt_xent
from lightning_mim.methods.swinunetr_ssl import SwinUNETRSSL
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(img_size=64, feature_size=12, depths=[1, 1, 1, 1], window_size=4, contrast_dim=16)


def test_rotation_planes_by_hand():
    image = torch.zeros(1, 1, 2, 2, 2)
    image[0, 0, 0, 0, 1] = 1.0  # x 0, y 0, z 1
    code = rotate90(image, torch.tensor([1]), "code")  # rotates the (y, z) plane
    assert code[0, 0, 0].nonzero().tolist() == [[0, 0]]  # (y 0, z 1) → (y 0, z 0): torch.rot90 counter-clockwise
    axial = rotate90(image, torch.tensor([1]), "axial")  # rotates (x, y): z unchanged
    assert axial[0, 0, :, :, 1].sum() == 1 and torch.equal(rotate90(image, torch.tensor([4]), "code"), image)
    with pytest.raises(ValueError, match="equal sides"):
        rotate90(torch.zeros(1, 1, 4, 4, 2), torch.tensor([1]), "code")


def test_noise_boxes_stay_in_unit_range_and_paste_copies_the_partner():
    g = torch.Generator().manual_seed(0)
    image = torch.full((1, 40, 40, 40), 7.0)
    noisy, changed = drop_boxes(image, 0.3, g)
    assert changed.any() and noisy[0][changed].min() >= 0 and noisy[0][changed].max() <= 1
    assert torch.all(noisy[0][~changed] == 7.0)
    source = torch.full_like(image, -3.0)
    pasted, changed = drop_boxes(image, 0.3, g, source=source)
    assert torch.all(pasted[0][changed] == -3.0) and torch.all(pasted[0][~changed] == 7.0)


def test_cutout_pastes_from_another_crop_only():
    g = torch.Generator().manual_seed(3)
    images = torch.stack([torch.full((1, 40, 40, 40), float(10 + i)) for i in range(3)])
    out, masks = cutout(images, g, 0.3)
    for i in range(3):
        changed = out[i][masks[i]]
        assert not torch.any(changed == 10 + i)  # own values never pasted back
        assert torch.all((changed <= 1) | (changed >= 10))  # noise in [0, 1] or another crop's value
    with pytest.raises(ValueError, match="at least 2 crops"):
        cutout(images[:1], g)
    single, masks = cutout(images[:1], g, allow_no_partner=True)
    assert torch.all(single[masks] <= 1)


def test_vae_head_upsamples_by_the_stride():
    head = VAEUpsampleHead(96, 1, 32)
    assert head(torch.rand(2, 96, 2, 2, 2)).shape == (2, 1, 64, 64, 64)


def test_losses_match_a_manual_composition_and_gradients_flow():
    torch.manual_seed(0)
    model = SwinUNETRSSL(**TINY)
    images = torch.rand(2, 1, 64, 64, 64)
    model.capture_visuals = True
    out = model.shared_step({"image": images})
    inputs, targets, labels, _ = model.corrupt(images, model.step_generator(model.hparams.seed))
    rot, emb, rec = model.heads(inputs)
    torch.testing.assert_close(out.losses["rotation"], F.cross_entropy(rot, labels))
    torch.testing.assert_close(out.losses["contrast"], nt_xent(emb[:2], emb[2:], 0.5))
    torch.testing.assert_close(out.losses["reconstruction"], (rec - targets).abs().mean())
    torch.testing.assert_close(out.losses["loss"].detach(), out.losses["rotation"] + out.losses["contrast"]
                               + out.losses["reconstruction"])
    assert list(out.visuals) == ["rotated", "corrupted", "reconstruction", "heat/cutout"]
    out.losses["loss"].backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="head_token"):
        SwinUNETRSSL(**TINY, head_token=8)
    with pytest.raises(ValueError, match="at least 64"):
        SwinUNETRSSL(**{**TINY, "img_size": 32})
    with pytest.raises(ValueError, match="equal sides"):  # the axial plane of a 64 × 32 × 32 crop is not square
        SwinUNETRSSL(**{**TINY, "img_size": (64, 32, 32)}, rotation_plane="axial")


def test_non_cubic_crops_with_a_two_voxel_bottleneck():
    model = SwinUNETRSSL(**{**TINY, "img_size": (64, 32, 32)})
    out = model.shared_step({"image": torch.rand(2, 1, 64, 32, 32)})
    out.losses["loss"].backward()
    assert torch.isfinite(out.losses["loss"]) and model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_export_loads_strictly_into_monai_swinunetr_swinvit():
    model = SwinUNETRSSL(**TINY)
    export = model.export_encoder()
    net = SwinUNETR(out_channels=3, **export.network_kwargs)
    net.swinViT.load_state_dict({k.removeprefix("swinViT."): v for k, v in export.state_dict.items()}, strict=True)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.swinViT(x)[-1], model.encoder(x)[-1])


def test_bf16_autocast_step():
    bf16_step(SwinUNETRSSL(**{**TINY, "feature_size": 6}), {"image": torch.rand(2, 1, 64, 64, 64)})


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "swinunetr_ssl.yaml", "swinunetr_ssl_tiny.yaml")
    assert_fit_outputs(trainer, tmp_path, ["loss", "rotation", "contrast", "reconstruction", "rotation_accuracy"], steps=2)
