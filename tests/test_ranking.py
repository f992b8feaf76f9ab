import math

import pytest
import torch

from lightning_mim.losses.ranking import pairwise_ranking_loss, spearman_correlation, zscore_regression_loss


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_ranking_loss_matches_hand_computed_value():
    pred = torch.tensor([[0.0, 1.0, 3.0]])
    actual = torch.tensor([[1.0, 2.0, 2.0]])  # patches 1 and 2 tie → their two ordered pairs are ignored
    selected = torch.ones(1, 3, dtype=torch.bool)
    eps = 1e-6
    terms = [
        -math.log(sigmoid(1.0 - 0.0) + eps),  # (i=0, j=1): ℓ1 > ℓ0
        -math.log(sigmoid(3.0 - 0.0) + eps),  # (0, 2): ℓ2 > ℓ0
        -math.log(1 - sigmoid(0.0 - 1.0) + eps),  # (1, 0): ℓ0 < ℓ1
        -math.log(1 - sigmoid(0.0 - 3.0) + eps),  # (2, 0): ℓ0 < ℓ2
    ]
    expected = sum(terms) / len(terms)
    assert pairwise_ranking_loss(pred, actual, selected).item() == pytest.approx(expected, rel=1e-6)


def test_tied_pairs_and_unselected_patches_give_no_gradient():
    pred = torch.tensor([[0.3, -0.2, 0.9, 1.5]], requires_grad=True)
    actual = torch.tensor([[1.0, 2.0, 2.0, 5.0]])
    # only patches 1 and 2 selected, and they tie: no valid pair at all
    selected = torch.tensor([[False, True, True, False]])
    loss = pairwise_ranking_loss(pred, actual, selected)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    # patches 0, 1, 2 selected: the gradient equals that of the explicit non-tied pairs only
    pred.grad = None
    selected = torch.tensor([[True, True, True, False]])
    pairwise_ranking_loss(pred, actual, selected).backward()
    reference = pred.detach().clone().requires_grad_(True)
    s = reference[0]
    pairs = [(0, 1, True), (0, 2, True), (1, 0, False), (2, 0, False)]  # (i, j, ℓ_j > ℓ_i)
    total = sum(
        -torch.log(torch.sigmoid(s[j] - s[i]) + 1e-6) if up else -torch.log(1 - torch.sigmoid(s[j] - s[i]) + 1e-6)
        for i, j, up in pairs
    ) / len(pairs)
    total.backward()
    assert torch.allclose(pred.grad, reference.grad, atol=1e-7)
    assert pred.grad[0, 3] == 0


def test_targets_are_detached():
    pred = torch.randn(2, 6, requires_grad=True)
    actual = torch.rand(2, 6, requires_grad=True)
    pairwise_ranking_loss(pred, actual, torch.ones(2, 6, dtype=torch.bool)).backward()
    assert actual.grad is None and pred.grad is not None


def test_zscore_regression_loss_uses_selected_patches_only():
    actual = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    selected = torch.tensor([[True, True, True, False]])
    target = torch.tensor([[-1.0, 0.0, 1.0, 0.0]])  # z-scores of 1, 2, 3 (unbiased std = 1)
    assert zscore_regression_loss(target, actual, selected).item() == pytest.approx(0.0, abs=1e-5)
    shifted = target + torch.tensor([[0.0, 0.0, 0.0, 9.0]])  # a visible patch's prediction is free
    assert zscore_regression_loss(shifted, actual, selected).item() == pytest.approx(0.0, abs=1e-5)
    assert zscore_regression_loss(target + 1, actual, selected).item() == pytest.approx(1.0, rel=1e-4)


def test_spearman_per_sample_over_selected_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    y = torch.stack([x[0] ** 3, -x[1]])
    assert torch.allclose(spearman_correlation(x, y), torch.tensor([1.0, -1.0]))
    # an outlier outside the selection does not count; inside it does
    y2 = torch.tensor([[1.0, 2.0, 3.0, 4.0, -9.0]] * 2)
    selected = torch.tensor([[True, True, True, True, False], [True] * 5])
    rho = spearman_correlation(x, y2, selected)
    assert rho[0].item() == pytest.approx(1.0)
    assert rho[1].item() == pytest.approx(0.0, abs=1e-6)  # ranks (1,2,3,4,0) vs (0,1,2,3,4): ρ = 1 − 6·20/120
    # fewer than two selected entries → 0, not NaN
    lonely = torch.tensor([[True, False, False, False, False]] * 2)
    assert torch.equal(spearman_correlation(x, y, lonely), torch.zeros(2))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="B x L"):
        pairwise_ranking_loss(torch.zeros(2, 4), torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool))
