"""HybridMIM's two-level masking hierarchy (methods.md §6.3) and its voxel-fill mask applier.

Level 1 masks patches (cells) of the input; level 2 groups the cell grid into regions of
``region³`` cells (2³ = 8 patches of 16³ → one 32³ sub-volume) and labels each region with the
number of its masked cells and their ``region³``-bit pattern. The method predicts these labels from
the bottleneck feature that covers the region, so regions are grouped **spatially** and enumerated
in the same row-major order as a flattened bottleneck feature map. Inside a region the bits are
also row-major over (axis0, axis1, axis2).

The official code groups consecutive indices of the flattened cell list instead (cells
``8i … 8i+7``), which are not 2×2×2 blocks, so its labels do not belong to the token that predicts
them; ``legacy=True`` reproduces that grouping for comparison runs only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_mim.masking.grid import flatten_mask, voxel_mask

Fill = Literal["zero", "noise"]


def region_grid(grid: Sequence[int], region: int) -> tuple[int, int, int]:
    """Number of regions along each axis of a cell grid; raises if the grid does not split evenly."""
    g = tuple(int(v) for v in grid)
    if len(g) != 3:
        raise ValueError(f"expected a 3D cell grid, got {g}")
    if region < 1 or any(v % region for v in g):
        raise ValueError(f"cell grid {g} cannot be split into regions of {region}³ cells")
    return g[0] // region, g[1] // region, g[2] // region


def group_regions(mask: Tensor, region: int = 2, legacy: bool = False) -> Tensor:
    """``B, G0, G1, G2`` cell mask → ``B, R, region³`` (cells of each region, regions row-major).

    Spatial grouping is ``mask.view(B, R0, r, R1, r, R2, r).permute(0, 1, 3, 5, 2, 4, 6)``; with
    ``legacy=True`` region ``i`` is cells ``i·r³ … (i+1)·r³ − 1`` of the flattened list (official code).
    """
    b = mask.shape[0]
    r0, r1, r2 = region_grid(mask.shape[1:], region)
    cells = region**3
    if legacy:
        return flatten_mask(mask).reshape(b, r0 * r1 * r2, cells)
    grouped = mask.reshape(b, r0, region, r1, region, r2, region).permute(0, 1, 3, 5, 2, 4, 6)
    return grouped.reshape(b, r0 * r1 * r2, cells)


@dataclass
class RegionLabels:
    """Targets of the region-level heads: ``counts`` (``B, R`` long, 0..r³) and ``patterns`` (``B, R, r³`` float)."""

    counts: Tensor
    patterns: Tensor


def region_labels(mask: Tensor, region: int = 2, legacy: bool = False) -> RegionLabels:
    """Count and bit-pattern labels of every region of a ``B, G0, G1, G2`` boolean cell mask."""
    patterns = group_regions(mask, region, legacy).float()
    return RegionLabels(counts=patterns.sum(dim=-1).long(), patterns=patterns)


def fill_masked_voxels(images: Tensor, cell_mask: Tensor, cell: int, fill: Fill = "zero",
                       generator: torch.Generator | None = None) -> Tensor:
    """Overwrite the voxels of masked cells (the ``voxel_fill`` applier of methods.md §2.2).

    ``zero`` is the official code: with inputs scaled to [0.001, 1] a 0 never occurs in real data.
    ``noise`` follows the paper figure: i.i.d. uniform [0, 1) values, the preset's intensity range.
    """
    where = voxel_mask(cell_mask, cell).bool().expand_as(images)
    if fill == "zero":
        replacement = torch.zeros((), dtype=images.dtype, device=images.device)
    elif fill == "noise":
        replacement = torch.rand(images.shape, generator=generator, device=images.device).to(images.dtype)
    else:
        raise ValueError(f"unknown fill {fill!r}; choose 'zero' or 'noise'")
    return torch.where(where, replacement, images)
