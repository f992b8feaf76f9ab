import pytest
import torch

from lightning_mim.masking.grid import (
    flatten_mask,
    grid_shape,
    patchify,
    unflatten_mask,
    unpatchify,
    upsample_mask,
    voxel_mask,
)


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 12, 16)
    patches = patchify(x, 4)
    assert patches.shape == (2, 2 * 3 * 4, 4**3 * 3)
    assert torch.equal(unpatchify(patches, 4, (2, 3, 4), channels=3), x)


def test_patch_order_is_row_major_and_channels_last():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4, 4)
    patches = patchify(x, 2)
    # token 1 is grid position (0, 0, 1): voxels [0:2, 0:2, 2:4]
    expected_first_voxel = x[0, :, 0, 0, 2]
    assert torch.equal(patches[0, 1, :2], expected_first_voxel)
    # inside a patch the last voxel axis is fastest after channels: (p0, p1, p2, C)
    assert torch.equal(patches[0, 0, 2:4], x[0, :, 0, 0, 1])


def test_grid_shape_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        grid_shape((96, 96, 90), 16)


def test_mask_upsampling_matches_patch_order():
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = True
    vox = voxel_mask(mask, 4)
    assert vox.shape == (1, 1, 8, 8, 8)
    assert vox[0, 0, 4:8, 0:4, 4:8].all() and vox.sum() == 64
    # the flattened mask index of the masked cell equals the patchify token index of the same voxels
    token = flatten_mask(mask)[0].nonzero().item()
    image = torch.zeros(1, 1, 8, 8, 8)
    image[vox.bool()] = 1.0
    assert patchify(image, 4)[0].sum(-1).nonzero().item() == token
    assert torch.equal(unflatten_mask(flatten_mask(mask), (2, 2, 2)), mask)
    assert upsample_mask(mask, 2).shape == (1, 4, 4, 4)
