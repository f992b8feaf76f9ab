import math

import pytest
import torch

from lightning_mim.masking.guided import GuidedMask, guided_mask, num_hard_patches
from lightning_mim.masking.random import num_masked
from lightning_mim.masking.visuals import guided_mask_visuals
from lightning_mim.schedules import ema_momentum_ramp, epochs_in, hard_patch_fraction


def permuted_scores(batch: int, total: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(total, generator=generator).float() for _ in range(batch)])


def test_hard_patches_are_exactly_the_top_scored_ones_plus_random_fill():
    scores = permuted_scores(4, 20)
    out = guided_mask(scores, num_masked=10, hard_fraction=0.5)
    assert out.mask.dtype == torch.bool and out.mask.shape == (4, 20)
    assert out.mask.sum(dim=1).tolist() == [10] * 4
    top5 = torch.zeros_like(out.mask).scatter_(1, scores.topk(5, dim=1).indices, True)
    assert torch.equal(out.hard, top5)
    assert bool((out.mask | ~out.hard).all())  # every hard patch is masked
    assert (out.mask & ~out.hard).sum(dim=1).tolist() == [5] * 4  # N − n_hard random ones


def test_floor_of_n_alpha_hard_patches():
    scores = permuted_scores(3, 216)
    n = num_masked(216, 0.75, "floor", by_keep=True)  # HPM / SelfMedHPM count
    assert n == 162
    for alpha, expected in ((0.5, 81), (0.3, 48), (0.004, 0)):
        out = guided_mask(scores, n, alpha)
        assert out.hard.sum(dim=1).tolist() == [expected] * 3
        assert out.mask.sum(dim=1).tolist() == [n] * 3
    assert num_hard_patches(100, 0.29) == 29  # 100·0.29 = 28.999… in floating point


def test_zero_alpha_is_fully_random_with_exact_counts():
    batch, total, n = 3000, 10, 4
    scores = torch.arange(total).float().expand(batch, total)  # patch 9 always scores highest
    out = guided_mask(scores, n, 0.0, generator=torch.Generator().manual_seed(1))
    assert not out.hard.any()
    assert out.mask.sum(dim=1).eq(n).all()
    frequency = out.mask.float().mean(dim=0)
    assert torch.allclose(frequency, torch.full((total,), n / total), atol=0.04)


def test_random_fill_is_uniform_over_the_remaining_patches():
    batch, total, n, alpha = 4000, 10, 6, 0.5  # 3 hard (patches 7, 8, 9), 3 drawn from the other 7
    scores = torch.arange(total).float().expand(batch, total)
    out = guided_mask(scores, n, alpha, generator=torch.Generator().manual_seed(2))
    frequency = out.mask.float().mean(dim=0)
    assert torch.equal(frequency[7:], torch.ones(3))
    assert torch.allclose(frequency[:7], torch.full((7,), 3 / 7), atol=0.03)


def test_generator_makes_masks_reproducible():
    scores = permuted_scores(2, 50)
    a = guided_mask(scores, 30, 0.2, generator=torch.Generator().manual_seed(5)).mask
    b = guided_mask(scores, 30, 0.2, generator=torch.Generator().manual_seed(5)).mask
    c = guided_mask(scores, 30, 0.2, generator=torch.Generator().manual_seed(6)).mask
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("scores", "count", "alpha", "message"),
    [
        (torch.zeros(8), 4, 0.5, "B x L"),
        (torch.zeros(2, 8), 9, 0.5, "cannot mask"),
        (torch.zeros(2, 8), 4, 1.5, r"\[0, 1\]"),
    ],
)
def test_bad_arguments_are_rejected(scores, count, alpha, message):
    with pytest.raises(ValueError, match=message):
        guided_mask(scores, count, alpha)


def test_difficulty_schedules_hit_their_documented_values():
    # HPM / SelfMedHPM easy-to-hard: α_e = 0.5·(e+1)/E
    assert hard_patch_fraction(0, 100, "easy_to_hard") == pytest.approx(0.005)
    assert hard_patch_fraction(49, 100, "easy_to_hard") == pytest.approx(0.25)
    assert hard_patch_fraction(99, 100, "easy_to_hard") == pytest.approx(0.5)
    # AnatoMask code: r_e = 0.5·(e+1)/(E−1), capped at r_max = 0.5
    assert hard_patch_fraction(0, 1000, "anatomask") == pytest.approx(0.5 / 999)
    assert hard_patch_fraction(998, 1000, "anatomask") == pytest.approx(0.5)
    assert hard_patch_fraction(999, 1000, "anatomask") == pytest.approx(0.5)
    # hard-to-easy alternative: 0.5 − 0.5·e/E
    assert hard_patch_fraction(0, 1000, "hard_to_easy") == pytest.approx(0.5)
    assert hard_patch_fraction(500, 1000, "hard_to_easy") == pytest.approx(0.25)
    assert hard_patch_fraction(10, 1000, "constant", max_fraction=0.3) == pytest.approx(0.3)
    # AnatoMask at epoch 0 of 1000 with 235 masked cells: floor(235·0.0005) = 0 → fully random
    assert num_hard_patches(235, hard_patch_fraction(0, 1000, "anatomask")) == 0
    assert num_hard_patches(235, hard_patch_fraction(999, 1000, "anatomask")) == 117


def test_ema_momentum_ramp_and_ramp_length():
    assert ema_momentum_ramp(0, 100) == pytest.approx(0.999)
    assert ema_momentum_ramp(50, 100) == pytest.approx(0.99945)
    assert ema_momentum_ramp(100, 100) == pytest.approx(0.9999)
    assert ema_momentum_ramp(700, 100) == pytest.approx(0.9999)
    assert epochs_in(0.25, "fraction", 1000) == 250  # AnatoMask: E/4
    assert epochs_in(0.1, "fraction", 10000) == pytest.approx(1000)  # SelfMedHPM choice: 0.1·E
    assert epochs_in(100, "epochs", 800) == 100  # HPM
    assert math.isclose(ema_momentum_ramp(125, epochs_in(0.25, "fraction", 1000)), 0.99945)
    with pytest.raises(ValueError, match="unit"):
        epochs_in(1, "steps", 10)


def test_hard_share_is_the_chosen_part_of_the_masked_patches():
    mask = torch.tensor([[True, True, True, True, False, False], [True, True, True, True, False, False]])
    hard = torch.tensor([[True, False, False, False, False, False], [True, True, True, False, False, False]])
    assert GuidedMask(mask, hard).hard_share().item() == pytest.approx(0.5)  # (1 + 3) / 2 of 4
    nothing = torch.zeros(2, 6, dtype=torch.bool)
    assert GuidedMask(nothing, nothing).hard_share().item() == 0.0


def test_guided_mask_panels_put_each_patch_value_on_its_voxels():
    images = torch.rand(1, 1, 4, 4, 8)  # 2 × 2 × 4 patches of 2³ voxels
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    hard = torch.zeros_like(mask)
    hard[0, 5] = True
    scores = torch.arange(16.0).unsqueeze(0)
    pred = torch.full((1, 16, 8), 7.0)
    visuals = guided_mask_visuals(images, pred, GuidedMask(mask, hard), scores, "teacher_loss", 2, (2, 2, 4),
                                  norm_pix=False)
    assert list(visuals) == ["input", "masked", "reconstruction", "heat/teacher_loss", "heat/mask"]
    heat, kinds = visuals["heat/teacher_loss"][0, 0], visuals["heat/mask"][0, 0]
    assert heat[0, 0, 0] == 0 and heat[0, 0, 2] == 1 and heat[0, 2, 2] == 5 and heat[3, 3, 7] == 15
    assert kinds[0, 0, 0] == 1 and kinds[0, 2, 2] == 2 and kinds[0, 0, 2] == 0  # random, hard, visible
    assert torch.equal(visuals["reconstruction"][0, 0, :2, :2, :2], torch.full((2, 2, 2), 7.0))
    assert torch.equal(visuals["reconstruction"][..., 2:, :, :], images[..., 2:, :, :])  # visible half unchanged
