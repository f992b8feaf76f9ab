"""SimCLR-3D: projector norms, loss wiring, gradient flow, export into each target, bf16, CLI fit."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.heads.projector import MLPProjector, pooled_pyramid
from lightning_mim.losses.contrastive import nt_xent
from lightning_mim.methods.simclr import SimCLR3D
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(img_size=32, unet_channels=[4, 8, 8, 16, 16], projector_hidden_dim=32, projector_dim=16)


def batch(b=3, seed=0):
    views = torch.rand(b, 2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"image": views[:, 0], "views": views}


def test_pooled_pyramid_concatenates_stage_means():
    maps = [torch.arange(8.0).view(1, 1, 2, 2, 2), torch.ones(1, 2, 1, 1, 1) * 3]
    assert pooled_pyramid(maps).tolist() == [[3.5, 3.0, 3.0]]


def test_sample_norm_normalises_each_embedding_and_batch_norm_uses_batch_statistics():
    x = torch.randn(5, 6)
    sample = MLPProjector(4, 6, 3, layers=2, norm="sample").net[1]
    y = sample(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    batch_norm = MLPProjector(4, 6, 3, layers=2, norm="batch").net[1].eval()
    z = batch_norm(x)  # eval mode still normalises with this batch's statistics (VoCo)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    assert not list(batch_norm.parameters())


def test_loss_is_nt_xent_of_the_projected_views_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = SimCLR3D(**TINY)
    data = batch()
    out = model.shared_step(data)
    z = model.embed(torch.cat([data["views"][:, 0], data["views"][:, 1]]))
    torch.testing.assert_close(out.losses["loss"], nt_xent(z[:3], z[3:], 0.5))
    out.losses["loss"].backward()
    assert model.encoder.net.stem.conv_0.conv.weight.grad.abs().sum() > 0
    # swapping the pairing changes the loss: the positives matter
    swapped = nt_xent(z[:3], z[3:].roll(1, 0), 0.5)
    assert not torch.allclose(swapped, out.losses["loss"])


def test_needs_two_views():
    with pytest.raises(ValueError, match="num_views: 2"):
        SimCLR3D(**TINY).shared_step({"image": torch.rand(2, 1, 32, 32, 32)})


def test_export_unet_encoder_loads_into_the_unet():
    model = SimCLR3D(**TINY)
    export = model.export_encoder()
    assert export.target == "hybridmim_unet"
    net = UNet3D(out_channels=3, **export.network_kwargs)
    result = net.load_state_dict(export.state_dict, strict=False)
    assert not result.unexpected_keys and all(k.startswith("decoder.") for k in result.missing_keys)
    assert torch.equal(net.encoder.stem.conv_0.conv.weight, model.encoder.net.stem.conv_0.conv.weight)


def test_swin_backbone_exports_swin_vit_strictly():
    model = SimCLR3D(backbone="swin", img_size=32, swin_feature_size=12, swin_depths=[1, 1, 1, 1],
                     projector_hidden_dim=16, projector_dim=8)
    assert torch.isfinite(model.shared_step(batch(2)).losses["loss"])
    export = model.export_encoder()
    net = SwinUNETR(out_channels=2, **export.network_kwargs)
    net.swinViT.load_state_dict({k.removeprefix("swinViT."): v for k, v in export.state_dict.items()}, strict=True)


def test_bf16_autocast_step():
    bf16_step(SimCLR3D(**TINY), batch())


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "simclr.yaml", "simclr_tiny.yaml")
    assert_fit_outputs(trainer, tmp_path, ["loss", "nt_xent", "positive_cosine"], steps=2)
