"""Network compositions (backbones/compositions.py, UNet3D): one encode / decode / export interface, no Trainer."""

import pytest
import torch

from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.backbones.compositions import (
    MaskedNetwork,
    SMITNetwork,
    SparKNetwork,
    SwinUNETRNetwork,
)
from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.heads.partial_decoder import SubBox
from lightning_mim.methods.hybridmim import NETWORKS, HybridMIM


def images(side=32, batch=2):
    torch.manual_seed(0)
    return torch.rand(batch, 1, side, side, side)


def tiny_swin(img_size=32, **overrides):
    return MaskedSwinEncoder.from_config("swin_unetr", img_size=img_size, feature_size=6, depths=(1, 1, 1, 1),
                                         window_size=4, **overrides)


def test_spark_network_encodes_the_visible_cells_and_decodes_a_full_volume():
    dense = STUNetEncoder(1, (4, 4, 8, 8, 8))
    network = SparKNetwork(dense, 16, 1)
    assert isinstance(network, MaskedNetwork)
    x, mask = images(), torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[:, 0] = True  # the first half of every volume hidden
    features = network.encode(x, mask)
    assert [f.shape[1] for f in features] == list(dense.feature_channels())
    assert features[-1].shape[2:] == mask.shape[1:]
    assert (features[-1][:, :, 0] == 0).all() and (features[-1][:, :, 1] != 0).any()  # nothing leaks from hidden cells
    out = network.decode(x, features, mask)
    assert out.shape == x.shape
    torch.testing.assert_close(network(x, mask), out)
    with pytest.raises(ValueError, match="mask"):
        network.encode(x)
    target, state, kwargs = network.export()
    assert target == "stunet_encoder" and state.keys() == dense.state_dict().keys()
    STUNetEncoder(**kwargs).load_state_dict(state)  # strict: raises on any missing or unexpected key


def test_smit_network_decodes_tap_tokens_into_head_logits_and_exports_the_encoder():
    network = SMITNetwork(tiny_swin(mask_cell=16), out_dim=16, hidden_dim=8, bottleneck_dim=4, nlayers=2,
                          norm_last_layer=True, shared_head=False)
    assert isinstance(network, MaskedNetwork)
    x = images()
    features = network.encode(x, network.encoder.token_mask(torch.ones(2, 2, 2, 2, dtype=torch.bool)))
    assert len(features) == 5
    out = network.decode(x, features)
    assert out.cls_logits.shape == (2, 16) and out.patch_logits.shape == (2, 8, 16)  # 2³ tap tokens of 16³ voxels
    assert out.bottleneck is features[-1]
    target, state, kwargs = network.export()
    assert target == "swin_unetr" and kwargs == network.encoder.swin_unetr_kwargs()
    assert all(k.startswith("swinViT.") for k in state) and "swinViT.mask_token" not in state


def test_swin_unetr_network_decodes_the_volume_or_a_sub_box():
    network = SwinUNETRNetwork(tiny_swin(64), in_channels=1, out_channels=2)
    assert isinstance(network, MaskedNetwork)
    x = torch.rand(1, 1, 64, 64, 32)
    features = network.encode(x)
    assert features[-1].shape[1:] == (network.bottleneck_channels, 2, 2, 1) and network.total_stride == 32
    assert network.decode(x, features).shape == (1, 2, 64, 64, 32)
    assert network.decode(x, features, box=SubBox((1, 0, 0), (1, 2, 1))).shape == (1, 2, 32, 64, 32)
    target, state, kwargs = network.export()
    assert target == "swin_unetr" and kwargs["normalize"] is True
    assert any(k.startswith("swinViT.") for k in state) and any(k.startswith("decoder1.") for k in state)
    assert not any(k.startswith("out.") for k in state)


def test_unet_is_a_masked_network_without_a_mask():
    network = UNet3D(1, 3, (4, 4, 8), (2, 2), dropout=0.0)
    assert isinstance(network, MaskedNetwork)
    x = images()
    features = network.encode(x)
    assert [f.shape[1] for f in features] == [4, 4, 8] and network.bottleneck_channels == 8
    torch.testing.assert_close(network.decode(x, features), network(x))
    with pytest.raises(ValueError, match="no mask"):
        network.encode(x, torch.zeros(2, 2, 2, 2, dtype=torch.bool))
    target, state, kwargs = network.export()
    assert target == "hybridmim_unet" and kwargs == {"in_channels": 1, "channels": [4, 4, 8], "strides": [2, 2],
                                                     "dropout": 0.0}
    assert set(network.state_dict()) - set(state) == {"decoder.out.conv.conv.weight", "decoder.out.conv.conv.bias"}


@pytest.mark.parametrize("backbone, kwargs", [
    ("swin", dict(feature_size=6, depths=(1, 1, 1, 1), window_size=4)),
    ("unet", dict(unet_channels=(4, 4, 8, 8, 16))),
])
def test_hybridmim_runs_every_backbone_through_its_composition(backbone, kwargs, monkeypatch):
    model = HybridMIM(backbone=backbone, img_size=(64, 32, 32), **kwargs)
    network = model.network
    assert isinstance(network, MaskedNetwork) and model.encoder is network.encoder and model.decoder is network.decoder
    # The method owns the parts under their own names (checkpoint keys unchanged); the composition is not saved.
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "decoder", "count_head", "location_head",
                                                              "projection"}
    calls = []
    for name in ("encode", "decode"):
        monkeypatch.setattr(network, name, lambda *a, _f=getattr(network, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    assert torch.isfinite(model.shared_step({"image": torch.rand(2, 1, 64, 32, 32)}).losses["loss"])
    assert sorted(calls) == ["decode", "encode", "encode"]  # the pair's two encoder passes, one decoder pass
    export = model.export_encoder()
    target, state, network_kwargs = network.export()
    assert (export.target, export.network_kwargs) == (target, network_kwargs) and export.state_dict.keys() == state.keys()


def test_hybridmim_names_its_backbones_in_one_table():
    assert set(NETWORKS) == {"swin", "unet"}
    with pytest.raises(ValueError, match="'swin' or 'unet'"):
        HybridMIM(backbone="vit", img_size=64)
