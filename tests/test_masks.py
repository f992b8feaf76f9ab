import math

import pytest
import torch

from lightning_mim.masking.random import num_masked, random_cell_mask, random_mask, visible_indices


def test_cell_mask_has_exact_ceil_count_per_sample():
    mask = random_cell_mask(5, (6, 6, 6), 0.7)
    assert mask.shape == (5, 6, 6, 6)
    assert (mask.flatten(1).sum(1) == math.ceil(0.7 * 216)).all()


def test_mae_rounding_keeps_floor_of_visible():
    assert num_masked(216, 0.75, "floor", by_keep=True) == 216 - 54
    assert num_masked(216, 0.4, "floor", by_keep=True) == 87
    assert num_masked(392, 0.6, "round", by_keep=True) == 235


def test_masks_differ_between_samples_and_follow_generator():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = random_mask(4, 64, 20, generator=g1), random_mask(4, 64, 20, generator=g2)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_visible_indices_are_the_unmasked_tokens_in_order():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert visible_indices(mask).tolist() == [[1, 3], [0, 1]]


def test_bad_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask ratio"):
        num_masked(10, 1.0)
