"""Uniformly random mask generators (SimMIM/SMIT cell masks, MAE/HPM/HybridMIM patch masks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Rounding = Literal["ceil", "floor", "round"]


def num_masked(total: int, ratio: float, rounding: Rounding = "ceil", *, by_keep: bool = False) -> int:
    """How many of ``total`` cells a ``ratio`` masks.

    SimMIM/SMIT round the masked count up (``ceil(r·L)``); MAE/HPM/HybridMIM round the *kept*
    count down (``L - floor(L·(1-r))``, pass ``by_keep=True, rounding="floor"``); SparK/AnatoMask
    round the kept count (``by_keep=True, rounding="round"``). The rule changes counts at small L.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    fn = {"ceil": math.ceil, "floor": math.floor, "round": round}[rounding]
    if by_keep:
        return total - int(fn(total * (1.0 - ratio)))
    return int(fn(total * ratio))


def random_mask(batch: int, total: int, count: int, *, device=None, generator: torch.Generator | None = None) -> Tensor:
    """``B, L`` boolean mask with exactly ``count`` True entries per row, uniformly at random."""
    if not 0 <= count <= total:
        raise ValueError(f"cannot mask {count} of {total} cells")
    noise = torch.rand(batch, total, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < count


def random_cell_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    *,
    rounding: Rounding = "ceil",
    by_keep: bool = False,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``B, G0, G1, G2`` mask with the same exact number of masked cells in every sample."""
    g = tuple(int(v) for v in grid)
    total = g[0] * g[1] * g[2]
    count = num_masked(total, ratio, rounding, by_keep=by_keep)
    return random_mask(batch, total, count, device=device, generator=generator).reshape(batch, *g)


def visible_indices(mask: Tensor) -> Tensor:
    """Indices of the visible tokens of a ``B, L`` mask with equal counts per row, in token order."""
    counts = (~mask).sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must have the same number of visible tokens")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts[0])]


def masked_indices(mask: Tensor) -> Tensor:
    """Indices of the masked tokens of a ``B, L`` mask with equal counts per row, in token order."""
    return visible_indices(~mask)
