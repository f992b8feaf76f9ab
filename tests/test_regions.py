"""HybridMIM region hierarchy (masking/regions.py) and region losses (losses/regions.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.losses.regions import (
    consistency_loss,
    count_accuracy,
    partial_region_loss,
    predicted_count,
)
from lightning_mim.masking.grid import upsample_mask
from lightning_mim.masking.regions import fill_masked_voxels, group_regions, region_grid, region_labels


def paint_regions(grid, region, legacy):
    """Cell grid where every cell holds the id of the region it is grouped into."""
    total = math.prod(grid)
    cell_index = torch.arange(total).reshape(1, *grid)
    members = group_regions(cell_index, region, legacy)[0]  # R × r³ cell indices
    owner = torch.empty(total, dtype=torch.long)
    for region_id, cells in enumerate(members):
        owner[cells] = region_id
    return owner.reshape(1, *grid)


@pytest.mark.parametrize("grid", [(6, 6, 6), (4, 6, 2)])
def test_spatial_grouping_maps_each_region_to_one_bottleneck_cube(grid):
    patch, region = 16, 2
    voxels = upsample_mask(paint_regions(grid, region, legacy=False), patch)[0]
    side = patch * region
    r0, r1, r2 = region_grid(grid, region)
    cubes = voxels.reshape(r0, side, r1, side, r2, side).permute(0, 2, 4, 1, 3, 5).reshape(r0 * r1 * r2, -1)
    # Each 32³ cube holds exactly one region id, and cube j (row-major, like a flattened bottleneck) holds id j.
    assert all(cube.unique().numel() == 1 for cube in cubes)
    assert torch.equal(cubes[:, 0], torch.arange(r0 * r1 * r2))


def test_legacy_grouping_is_not_spatial():
    voxels = upsample_mask(paint_regions((6, 6, 6), 2, legacy=True), 16)[0]
    cubes = voxels.reshape(3, 32, 3, 32, 3, 32).permute(0, 2, 4, 1, 3, 5).reshape(27, -1)
    assert any(cube.unique().numel() > 1 for cube in cubes)


def constructed_mask():
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    for cell in [(0, 0, 0), (1, 1, 1), (0, 2, 1), (3, 3, 3)]:
        mask[(0, *cell)] = True
    return mask


def test_counts_and_patterns_of_a_constructed_mask():
    labels = region_labels(constructed_mask(), region=2)
    # Regions are 2³ blocks, row-major; bits are row-major inside the block.
    assert labels.counts.tolist() == [[2, 0, 1, 0, 0, 0, 0, 1]]
    expected = torch.zeros(1, 8, 8)
    expected[0, 0, 0] = expected[0, 0, 7] = 1  # (0,0,0) and (1,1,1)
    expected[0, 2, 1] = 1  # (0,2,1): region (0,1,0) = 2, offset (0,0,1) = bit 1
    expected[0, 7, 7] = 1  # (3,3,3)
    assert torch.equal(labels.patterns, expected)
    assert labels.counts.dtype == torch.long


def test_legacy_flag_reproduces_consecutive_grouping():
    labels = region_labels(constructed_mask(), region=2, legacy=True)
    # Flat indices 0, 21, 9, 63 → regions 0, 2, 1, 7 with bits 0, 5, 1, 7 (official get_mask_labels*).
    assert labels.counts.tolist() == [[1, 1, 1, 0, 0, 0, 0, 1]]
    assert labels.patterns[0].nonzero().tolist() == [[0, 0], [1, 1], [2, 5], [7, 7]]


def test_region_grid_rejects_indivisible_grids():
    with pytest.raises(ValueError, match="regions"):
        region_grid((6, 5, 6), 2)
    with pytest.raises(ValueError, match="regions"):
        group_regions(torch.zeros(1, 3, 3, 3, dtype=torch.bool), 2)


def test_zero_fill_touches_masked_cells_only():
    images = torch.rand(2, 1, 8, 8, 8) + 0.001
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = True
    filled = fill_masked_voxels(images, mask, 4, "zero")
    assert (filled[0, 0, 4:, :4, 4:] == 0).all()
    assert (filled != 0).sum() == images.numel() - 64
    assert torch.equal(filled[1], images[1])


def test_noise_fill_replaces_masked_voxels_with_unit_noise():
    images = torch.full((1, 2, 8, 8, 8), 5.0)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    filled = fill_masked_voxels(images, mask, 4, "noise")
    box = filled[0, :, :4, :4, :4]
    assert (box >= 0).all() and (box < 1).all() and box.unique().numel() > 100
    filled[0, :, :4, :4, :4] = 5.0
    assert torch.equal(filled, images)
    with pytest.raises(ValueError, match="fill"):
        fill_masked_voxels(images, mask, 4, "mean")


def test_partial_region_loss_ignores_visible_voxels():
    target = torch.rand(1, 1, 4, 4, 4)
    masked = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    masked[..., :2, :, :] = True
    pred = target.clone()
    pred[..., :2, :, :] += 0.5
    assert partial_region_loss(pred, target, masked).item() == pytest.approx(0.25)
    pred[..., 2:, :, :] = 7.0
    assert partial_region_loss(pred, target, masked).item() == pytest.approx(0.25)
    assert partial_region_loss(pred, target, torch.zeros_like(masked)).item() == 0.0


def test_consistency_loss_matches_hand_computation_and_only_trains_the_count_head():
    count_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], requires_grad=True)  # ĉ = 0, 2
    location_logits = torch.tensor([[[1.0, 3.0], [-1.0, 0.5]]], requires_grad=True)  # k̂ = 2, 1
    assert predicted_count(location_logits).tolist() == [[2, 1]]
    loss = consistency_loss(count_logits, location_logits)
    ce = (-F.log_softmax(count_logits[0, 0], 0)[2] - F.log_softmax(count_logits[0, 1], 0)[1]) / 2
    mse = ((2 - 0) ** 2 + (1 - 2) ** 2) / 2
    assert loss.item() == pytest.approx(0.5 * (ce.item() + mse), rel=1e-6)
    loss.backward()
    assert location_logits.grad is None  # the MSE term has no gradient path
    expected = torch.autograd.grad(0.5 * ce, count_logits)[0]
    assert torch.allclose(count_logits.grad, expected)


def test_count_accuracy():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    assert count_accuracy(logits, torch.tensor([[1, 0, 0]])).item() == pytest.approx(2 / 3)
