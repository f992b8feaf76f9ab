"""Losses and metrics for the HPM loss predictor (methods.md §5.1): ranking BCE, z-score MSE, Spearman.

All inputs are ``B, L`` per-patch values with a ``B, L`` boolean selection (True = the patch takes
part, e.g. the masked tokens). Everything is computed in float32 and vectorised over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(pred: Tensor, actual: Tensor, selected: Tensor) -> None:
    if pred.ndim != 2 or pred.shape != actual.shape or pred.shape != selected.shape:
        raise ValueError(
            f"pred, actual and selected must all be B x L, got {tuple(pred.shape)}, {tuple(actual.shape)}, "
            f"{tuple(selected.shape)}"
        )


def pairwise_ranking_loss(pred: Tensor, actual: Tensor, selected: Tensor, eps: float = 1e-6) -> Tensor:
    """HPM's relative loss: binary cross-entropy on the order of every pair of selected patches.

    For ordered pairs ``(i, j)`` of selected patches of the same image with ``ℓ_i ≠ ℓ_j``:
    ``−log(σ(ŝ_j − ŝ_i) + eps)`` if ``ℓ_j > ℓ_i`` else ``−log(1 − σ(ŝ_j − ŝ_i) + eps)``, averaged over
    all such pairs of the batch. Tied pairs (and ``i = j``) are excluded, so they contribute no
    gradient. ``actual`` is detached here: the targets never receive gradients.
    """
    _check(pred, actual, selected)
    pred, actual = pred.float(), actual.detach().float()
    diff_pred = pred.unsqueeze(1) - pred.unsqueeze(2)  # [b, i, j] = ŝ_j − ŝ_i
    diff_actual = actual.unsqueeze(1) - actual.unsqueeze(2)  # [b, i, j] = ℓ_j − ℓ_i
    pair = selected.unsqueeze(1) & selected.unsqueeze(2) & (diff_actual != 0)
    prob = torch.sigmoid(diff_pred)
    per_pair = torch.where(diff_actual > 0, -torch.log(prob + eps), -torch.log(1.0 - prob + eps))
    per_pair = torch.where(pair, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum() / pair.sum().clamp_min(1)


def zscore_regression_loss(pred: Tensor, actual: Tensor, selected: Tensor, eps: float = 1e-6) -> Tensor:
    """HPM's non-relative alternative: MSE between ``ŝ`` and the per-image z-scored ``ℓ``.

    Mean and (unbiased) standard deviation are taken over each image's selected patches only, since
    the losses of unselected (visible) patches are not targets.
    """
    _check(pred, actual, selected)
    weights = selected.float()
    count = weights.sum(dim=1, keepdim=True)
    actual = actual.detach().float()
    mean = (actual * weights).sum(dim=1, keepdim=True) / count.clamp_min(1)
    var = ((actual - mean).square() * weights).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)
    target = (actual - mean) / torch.sqrt(var + eps)
    sq = (pred.float() - target).square() * weights
    return sq.sum() / weights.sum().clamp_min(1)


def _ranks(values: Tensor, selected: Tensor) -> Tensor:
    """0-based ranks of the selected entries within their row (unselected entries are pushed last)."""
    keyed = values.float().masked_fill(~selected, float("inf"))
    return keyed.argsort(dim=1).argsort(dim=1).float()


def spearman_correlation(x: Tensor, y: Tensor, selected: Tensor | None = None) -> Tensor:
    """Spearman rank correlation per sample (``B``) over the selected entries of each row.

    Ranks come from a double ``argsort``, so ties get distinct (arbitrary) ranks rather than
    averaged ones — adequate for a monitoring signal on continuous losses. Rows with fewer than two
    selected entries, or with a constant rank vector, return 0.
    """
    if selected is None:
        selected = torch.ones_like(x, dtype=torch.bool)
    _check(x, y, selected)
    weights = selected.float()
    count = weights.sum(dim=1, keepdim=True).clamp_min(1)
    rx, ry = _ranks(x, selected), _ranks(y, selected)
    rx = (rx - (rx * weights).sum(1, keepdim=True) / count) * weights
    ry = (ry - (ry * weights).sum(1, keepdim=True) / count) * weights
    cov = (rx * ry).sum(dim=1)
    norm = torch.sqrt(rx.square().sum(dim=1) * ry.square().sum(dim=1))
    return torch.where(norm > 0, cov / norm.clamp_min(1e-12), torch.zeros_like(cov))
