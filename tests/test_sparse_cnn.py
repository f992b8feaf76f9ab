import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.backbones.sparse import SparseEncoder, expand_visibility, sparse_norm
from lightning_mim.heads.light_decoder import Densify, LightDecoder
from lightning_mim.masking.random import random_mask

DIMS = (4, 8, 8, 16, 16)


def tiny_encoder(**kw) -> STUNetEncoder:
    torch.manual_seed(0)
    return STUNetEncoder(1, kw.pop("dims", DIMS), kw.pop("depths", 1))


def cell_mask(batch: int, grid=(2, 2, 2), count: int = 5, seed: int = 0) -> torch.Tensor:
    total = grid[0] * grid[1] * grid[2]
    return random_mask(batch, total, count, generator=torch.Generator().manual_seed(seed)).reshape(batch, *grid)


def test_stunet_encoder_shapes_and_structure():
    enc = STUNetEncoder(2, (8, 16, 32, 64, 128), depths=(1, 2, 1, 1, 1))
    feats = enc(torch.randn(1, 2, 32, 32, 48))
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64, 128]
    assert [tuple(f.shape[2:]) for f in feats] == [(32, 32, 48), (16, 16, 24), (8, 8, 12), (4, 4, 6), (2, 2, 3)]
    assert enc.downsample_ratio() == 16 and enc.feature_channels() == (8, 16, 32, 64, 128)
    # first block of every stage projects its shortcut; later blocks keep the identity
    assert all(isinstance(stage[0].shortcut, nn.Conv3d) for stage in enc.stages)
    assert isinstance(enc.stages[1][1].shortcut, nn.Identity)
    assert isinstance(enc.stages[0][0].norm1, nn.InstanceNorm3d) and enc.stages[0][0].norm1.affine
    with pytest.raises(ValueError, match="not divisible by the downsample ratio 16"):
        enc(torch.randn(1, 2, 40, 32, 32))


def test_sparse_convolutions_leave_hidden_positions_exactly_zero():
    sparse = SparseEncoder(tiny_encoder())
    mask = cell_mask(2)
    feats = sparse(torch.randn(2, 1, 32, 32, 32), mask)
    for feat in feats:
        hidden = ~expand_visibility(~mask, feat.shape[2:]).expand_as(feat)
        assert bool((feat[hidden] == 0).all())
        assert bool((feat[~hidden] != 0).any())


@pytest.mark.parametrize("statistics", ["batch", "sample"])
def test_hidden_voxels_do_not_influence_visible_outputs(statistics):
    sparse = SparseEncoder(tiny_encoder(), statistics)
    mask = cell_mask(2, seed=3)
    x = torch.randn(2, 1, 32, 32, 32)
    hidden_voxels = ~expand_visibility(~mask, x.shape[2:])
    x_changed = torch.where(hidden_voxels, torch.randn_like(x) * 50 + 7, x)
    for a, b in zip(sparse(x, mask), sparse(x_changed, mask)):
        assert torch.equal(a, b)
    # sanity: the dense encoder does see the change
    assert not torch.allclose(sparse.encoder(x)[-1], sparse.encoder(x_changed)[-1])


def test_sparse_instance_norm_statistics_cover_visible_voxels_only():
    torch.manual_seed(0)
    norm = nn.InstanceNorm3d(3, affine=True)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 4, 4, 4)
    visible = torch.zeros(2, 1, 4, 4, 4, dtype=torch.bool)
    visible[0, :, :2] = True
    visible[1, :, :, 1:] = True
    per_sample = sparse_norm(norm, x, visible, "sample")
    pooled = sparse_norm(norm, x, visible, "batch")
    for b in range(2):
        values = x[b][:, visible[b, 0]]  # C × n_visible
        mean, var = values.mean(dim=1), values.var(dim=1, unbiased=False)
        expected = (values - mean[:, None]) / torch.sqrt(var[:, None] + norm.eps) * norm.weight[:, None] + norm.bias[:, None]
        assert torch.allclose(per_sample[b][:, visible[b, 0]], expected, atol=1e-5)
    gathered = x.permute(0, 2, 3, 4, 1)[visible[:, 0]]  # all visible voxels of the batch, N × C
    expected = F.batch_norm(gathered, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    assert torch.allclose(pooled.permute(0, 2, 3, 4, 1)[visible[:, 0]], expected, atol=1e-5)
    assert bool((per_sample[~visible.expand_as(x)] == 0).all()) and bool((pooled[~visible.expand_as(x)] == 0).all())
    # the hidden voxels' values (not zeroed here) do not matter at all
    x_changed = torch.where(visible, x, torch.randn_like(x) * 100)
    assert torch.equal(sparse_norm(norm, x_changed, visible, "sample"), per_sample)
    assert torch.equal(sparse_norm(norm, x_changed, visible, "batch"), pooled)


def test_sparse_batch_norm_matches_batch_norm_on_the_visible_voxels_and_tracks_them():
    torch.manual_seed(0)
    norm, reference = nn.BatchNorm3d(3), nn.BatchNorm1d(3)  # the reference sees the N × C visible voxels
    x = torch.randn(2, 3, 4, 4, 4) * 3 + 1
    visible = torch.rand(2, 1, 4, 4, 4) > 0.5
    gathered = x.permute(0, 2, 3, 4, 1)[visible[:, 0]]
    out = sparse_norm(norm, x, visible)
    expected = reference(gathered)
    assert torch.allclose(out.permute(0, 2, 3, 4, 1)[visible[:, 0]], expected, atol=1e-5)
    assert torch.allclose(norm.running_mean, reference.running_mean, atol=1e-6)
    assert torch.allclose(norm.running_var, reference.running_var, atol=1e-6)
    norm.eval(), reference.eval()
    assert torch.allclose(sparse_norm(norm, x, visible).permute(0, 2, 3, 4, 1)[visible[:, 0]], reference(gathered), atol=1e-5)


def test_wrapper_keeps_the_dense_encoder_plain_and_its_weights_load_strictly():
    dense = tiny_encoder()
    keys = list(dense.state_dict())
    sparse = SparseEncoder(dense)
    x = torch.randn(1, 1, 32, 32, 32)
    before = [f.clone() for f in dense(x)]
    sparse(x, cell_mask(1))
    # nothing mask-related survives the forward: no hooks, no swapped forwards, same outputs
    for module in dense.modules():
        assert not module._forward_hooks and "forward" not in module.__dict__
    assert all(torch.equal(a, b) for a, b in zip(before, dense(x)))
    assert list(sparse.encoder.state_dict()) == keys
    fresh = STUNetEncoder(1, DIMS, 1)
    fresh.load_state_dict(sparse.encoder.state_dict(), strict=True)
    # a deep copy (the EMA teacher) runs sparsely on its own
    teacher = copy.deepcopy(sparse)
    mask = cell_mask(1, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(teacher(x, mask), sparse(x, mask)))


def test_wrapper_rejects_unsupported_encoders_and_misaligned_masks():
    class GroupNormEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)

        def downsample_ratio(self):
            return 1

        def feature_channels(self):
            return (4,)

    with pytest.raises(TypeError, match="GroupNorm"):
        SparseEncoder(GroupNormEncoder())
    with pytest.raises(TypeError, match="downsample_ratio"):
        SparseEncoder(nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="downsample ratio 16"):
        SparseEncoder(tiny_encoder())(torch.randn(1, 1, 32, 32, 32), cell_mask(1, grid=(4, 4, 4), count=10))


def test_light_decoder_upsamples_by_the_ratio_with_halving_widths():
    decoder = LightDecoder(width=32, up_ratio=16, out_channels=2, norm="instance")
    assert decoder.block_widths == (32, 16, 8, 4)
    feats = [torch.randn(2, w, 2 * 2**i, 2 * 2**i, 3 * 2**i) for i, w in enumerate(decoder.block_widths)]
    assert decoder(feats).shape == (2, 2, 32, 32, 48)
    assert isinstance(LightDecoder(16, 4).blocks[0].conv[1], nn.BatchNorm3d)
    with pytest.raises(ValueError, match="power of two"):
        LightDecoder(32, 12)
    with pytest.raises(ValueError, match="halved"):
        LightDecoder(24, 16)


def test_densify_fills_hidden_positions_with_the_scale_mask_token():
    densify = Densify((16, 8), (16, 4))
    assert isinstance(densify.projections[0], nn.Identity) and densify.projections[1].kernel_size == (3, 3, 3)
    mask = cell_mask(2, count=3)
    visible = ~mask
    coarse = torch.randn(2, 16, 2, 2, 2) * expand_visibility(visible, (2, 2, 2))
    fine = torch.randn(2, 8, 4, 4, 4)
    out = densify([coarse, fine], visible)
    assert out[0].shape == (2, 16, 2, 2, 2) and out[1].shape == (2, 4, 4, 4, 4)
    token = densify.mask_tokens[0].reshape(16)
    assert torch.equal(out[0].permute(0, 2, 3, 4, 1)[mask], token.expand(int(mask.sum()), 16))
    assert float(densify.mask_tokens[0].detach().abs().max()) <= 0.02
