"""DINOv2 block masking in 3-D (methods-more §5.5): stratified ratios over half the global crops."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def block_mask(grid: Sequence[int], target: int, generator: torch.Generator | None = None, min_volume: int = 4,
               max_volume: int | None = None, aspect: float = 0.3, tries: int = 10) -> Tensor:
    """A ``G0, G1, G2`` boolean mask grown from random boxes until about ``target`` tokens are masked.

    Per round (DINOv2 ``MaskingGenerator`` in 3-D): up to ``tries`` boxes with volume
    ``v ~ U[min_volume, m]`` (``m`` = min(remaining, ``max_volume``)), two aspects ``a1, a2`` log-uniform in
    ``[aspect, 1/aspect]``, sides ``round(v^{1/3}·(a1, a2/a1, 1/a2))`` each strictly smaller than the
    grid, a random position; a box is kept when it adds between 1 and ``m`` new tokens. Stops at the
    target or when a round adds nothing.
    """
    grid = tuple(int(g) for g in grid)
    total = grid[0] * grid[1] * grid[2]
    max_volume = total if max_volume is None else int(max_volume)
    mask = torch.zeros(grid, dtype=torch.bool)
    count = 0
    log_low, log_high = math.log(aspect), math.log(1 / aspect)
    while count < target:
        limit = min(target - count, max_volume)
        added = 0
        for _ in range(tries):
            volume = _uniform(min_volume, limit, generator)
            a1 = math.exp(_uniform(log_low, log_high, generator))
            a2 = math.exp(_uniform(log_low, log_high, generator))
            base = volume ** (1 / 3)
            sides = [int(round(base * a1)), int(round(base * a2 / a1)), int(round(base / a2))]
            if all(1 <= s < g for s, g in zip(sides, grid)):
                start = [int(torch.randint(0, g - s + 1, (1,), generator=generator)) for s, g in zip(sides, grid)]
                box = tuple(slice(o, o + s) for o, s in zip(start, sides))
                new = int((~mask[box]).sum())
                if 0 < new <= limit:
                    mask[box] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


def dinov2_masks(num_crops: int, grid: Sequence[int], sample_probability: float = 0.5,
                 ratio_range: tuple[float, float] = (0.1, 0.5), generator: torch.Generator | None = None,
                 max_fraction: float = 0.5) -> Tensor:
    """Masks for ``num_crops`` global crops (``N, L`` bool, row-major tokens), DINOv2 ``collate_data_and_cast``.

    ``n_m = ⌊sample_probability · N⌋`` crops are masked, crop i of them with a target drawn uniformly in
    the i-th of ``n_m`` equal strata of ``ratio_range`` (times the token count); the rest stay
    unmasked; the order is shuffled. Blocks hold at most ``max_fraction`` of the tokens.
    """
    if not 0.0 <= sample_probability <= 1.0:
        raise ValueError(f"mask sample probability must be in [0, 1], got {sample_probability}")
    low, high = ratio_range
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 ≤ low ≤ high < 1, got {ratio_range}")
    tokens = int(grid[0]) * int(grid[1]) * int(grid[2])
    masked = int(num_crops * sample_probability)
    bounds = torch.linspace(low, high, masked + 1).tolist()
    masks = [block_mask(grid, int(tokens * _uniform(bounds[i], bounds[i + 1], generator)), generator,
                        max_volume=max(1, int(max_fraction * tokens))).flatten() for i in range(masked)]
    masks += [torch.zeros(tokens, dtype=torch.bool)] * (num_crops - masked)
    order = torch.randperm(num_crops, generator=generator)
    return torch.stack(masks)[order]
