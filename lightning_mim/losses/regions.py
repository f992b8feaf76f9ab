"""HybridMIM losses (methods.md §6.4): partial-region reconstruction and the region-level heads.

All take region logits shaped ``B, R, K`` (``K = r³ + 1`` count classes or ``r³`` location bits)
and compute in float32.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def partial_region_loss(pred: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """``Σ (x̂ − x)²·M / Σ M`` over the voxels of the decoded box.

    ``M`` is the mask itself (1 on voxels of masked patches inside the box), not the official
    "masked input == 0" test, so the loss is the same under noise fill. No masked voxel → 0.
    """
    weights = masked.float().expand_as(target)
    squared = (pred.float() - target.float()).square()
    return (squared * weights).sum() / weights.sum().clamp_min(1.0)


def count_loss(count_logits: Tensor, counts: Tensor) -> Tensor:
    """L_Num: cross-entropy of the per-region masked-cell count, averaged over regions × batch."""
    return F.cross_entropy(count_logits.float().flatten(0, -2), counts.flatten())


def location_loss(location_logits: Tensor, patterns: Tensor) -> Tensor:
    """L_Loc: binary cross-entropy of each region's masked-cell bits."""
    return F.binary_cross_entropy_with_logits(location_logits.float(), patterns.float())


def predicted_count(location_logits: Tensor) -> Tensor:
    """``k̂``: number of cells the location head calls masked (``σ(logit) > 0.5``), per region."""
    return (location_logits > 0).sum(dim=-1)


def consistency_loss(count_logits: Tensor, location_logits: Tensor) -> Tensor:
    """L_Con = ½ [CE(count_logits, sg(k̂)) + MSE(k̂, sg(ĉ))], ``ĉ = argmax count_logits`` (official code).

    Both ``k̂`` (a thresholded count) and ``ĉ`` (an argmax) are piecewise constant, so the MSE part
    has no gradient path: it only shifts the logged value. Only the CE part trains, and it trains the
    count head towards the location head's count. Kept as written for faithfulness.
    """
    k_hat = predicted_count(location_logits.detach())
    c_hat = count_logits.detach().argmax(dim=-1)
    ce = F.cross_entropy(count_logits.float().flatten(0, -2), k_hat.flatten())
    mse = F.mse_loss(k_hat.float(), c_hat.float())
    return 0.5 * (ce + mse)


def count_accuracy(count_logits: Tensor, counts: Tensor) -> Tensor:
    """Fraction of regions whose predicted count equals the true count."""
    return (count_logits.argmax(dim=-1) == counts).float().mean()
