"""Swin-3D encoder with mask token: configs, MONAI key layout, mask-token placement, grid validation."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from lightning_mim.backbones.swin import SWIN_CONFIGS, MaskedSwinEncoder
from lightning_mim.masking.grid import upsample_mask, voxel_mask
from lightning_mim.masking.random import random_cell_mask

TINY = dict(feature_size=12, depths=(1, 1, 1, 1))


def tiny(name: str, **kw) -> MaskedSwinEncoder:
    return MaskedSwinEncoder.from_config(name, **{"img_size": 32, "mask_cell": 16, **TINY, **kw})


def test_published_configs():
    smit = MaskedSwinEncoder.from_config("swin_smit", img_size=96, mask_cell=16)
    assert smit.stage_channels == (48, 96, 192, 384, 768)
    assert [len(s[0].blocks) for s in (smit.layers1, smit.layers2, smit.layers3, smit.layers4)] == [2, 2, 4, 2]
    attn = [blk.attn for s in (smit.layers1, smit.layers2, smit.layers3, smit.layers4) for blk in s[0].blocks]
    assert {a.num_heads for a in attn} == {4}
    assert all(a.window_size == (4, 4, 4) and a.qkv.bias is None for a in attn)
    assert smit.layers4[0].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert smit.patch_embed.norm is not None
    assert smit.layers4[0].downsample is not None  # merging after every stage → 3³×768 at 96³
    assert smit.cell_grid == (6, 6, 6) and smit.token_grid == (48, 48, 48)

    unetr = SWIN_CONFIGS["swin_unetr"]
    assert (unetr.depths, unetr.num_heads, unetr.window_size, unetr.qkv_bias, unetr.feature_size) == (
        (2, 2, 2, 2), (3, 6, 12, 24), 7, True, 48)


@pytest.mark.parametrize("name", ["swin_smit", "swin_unetr"])
def test_state_dict_loads_strictly_into_monai_swinunetr(name):
    encoder = tiny(name).eval()
    keys = set(encoder.state_dict())
    assert "mask_token" in keys
    net = SwinUNETR(out_channels=3, **encoder.swin_unetr_kwargs()).eval()
    weights = {k: v for k, v in encoder.state_dict().items() if k != "mask_token"}
    net.swinViT.load_state_dict(weights, strict=True)
    exported = encoder.swin_unetr_state_dict()
    assert set(exported) == {f"swinViT.{k}" for k in weights}
    missing, unexpected = net.load_state_dict(exported, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        for ours, theirs in zip(encoder(x), net.swinViT(x, True)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_five_stage_outputs_with_dropout_for_hybridmim():
    encoder = tiny("swin_unetr", drop_rate=0.1, mask_cell=None)
    assert encoder.pos_drop.p == pytest.approx(0.1)
    features = encoder.eval()(torch.rand(1, 1, 32, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [
        (12, 16, 16, 16), (24, 8, 8, 8), (48, 4, 4, 4), (96, 2, 2, 2), (192, 1, 1, 1)]
    channel_mean = features[2].mean(dim=1)
    torch.testing.assert_close(channel_mean, torch.zeros_like(channel_mean), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["swin_smit", "swin_unetr"])
def test_mask_token_replaces_exactly_the_masked_tokens(name):
    encoder = tiny(name).eval()
    with torch.no_grad():
        encoder.mask_token.copy_(torch.randn(12))
    x = torch.rand(2, 1, 32, 32, 32)
    cells = random_cell_mask(2, encoder.cell_grid, 0.5)
    tokens = encoder.token_mask(cells)
    assert tuple(tokens.shape) == (2, 16, 16, 16)
    plain, masked = encoder.embed(x), encoder.embed(x, tokens)
    where = tokens.unsqueeze(1).expand_as(masked)
    assert torch.equal(masked[~where], plain[~where])
    expected = encoder.mask_token.view(1, -1, 1, 1, 1).expand_as(masked)
    assert torch.equal(masked[where], expected[where])
    assert not torch.equal(plain[where], masked[where])
    # and it is what the first stage receives
    torch.testing.assert_close(encoder(x, tokens, normalize=False)[0], masked)


def test_cell_token_voxel_grids_line_up_end_to_end():
    """Voxels under masked cells cannot reach the encoder; every visible voxel can."""
    encoder = tiny("swin_smit").eval()
    cells = random_cell_mask(2, encoder.cell_grid, 0.5, generator=torch.Generator().manual_seed(0))
    tokens = encoder.token_mask(cells)
    voxels = voxel_mask(cells, 16)
    torch.testing.assert_close(voxels, upsample_mask(tokens, 2).unsqueeze(1).float())
    # token (i, j, k) belongs to cell (i // 8, j // 8, k // 8)
    idx = torch.arange(16) // 8
    assert torch.equal(tokens, cells[:, idx][:, :, idx][:, :, :, idx])
    x = torch.rand(2, 1, 32, 32, 32)
    noisy_masked = torch.where(voxels.bool(), torch.rand_like(x), x)
    with torch.no_grad():
        assert torch.equal(encoder.embed(x, tokens), encoder.embed(noisy_masked, tokens))
        visible = (~voxels.bool()).nonzero()[0]
        poked = x.clone()
        poked[tuple(visible)] += 1.0
        assert not torch.equal(encoder.embed(x, tokens), encoder.embed(poked, tokens))


def test_bad_geometry_fails_at_construction():
    with pytest.raises(ValueError, match="divisible by patch size"):
        tiny("swin_unetr", img_size=48)
    with pytest.raises(ValueError, match="multiple of the token patch"):
        tiny("swin_unetr", img_size=96, mask_cell=15)
    with pytest.raises(ValueError, match="not divisible by the cell size"):
        tiny("swin_unetr", img_size=64, mask_cell=24)
    with pytest.raises(ValueError, match="4 stages"):
        tiny("swin_unetr", depths=(1, 1, 1))
    with pytest.raises(ValueError, match="heads"):
        tiny("swin_smit", feature_size=12, num_heads=(5, 5, 5, 5))
    with pytest.raises(ValueError, match="unknown Swin config"):
        MaskedSwinEncoder.from_config("swin_large")


def test_bad_inputs_fail_clearly():
    encoder = tiny("swin_smit")
    with pytest.raises(ValueError, match="divisible by 32"):
        encoder(torch.rand(1, 1, 40, 32, 32))
    with pytest.raises(ValueError, match="token grid"):
        encoder.embed(torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 8, 8, 8, dtype=torch.bool))
    encoder.remove_mask_token()
    assert "mask_token" not in encoder.state_dict()
    with pytest.raises(RuntimeError, match="no mask token"):
        encoder.embed(torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 16, 16, 16, dtype=torch.bool))
