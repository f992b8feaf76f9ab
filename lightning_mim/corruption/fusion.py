"""Volume Fusion label generators and fusion (Wang et al., arXiv 2306.16925; methods-more §3).

A label map ``L ∈ {0, …, K}`` assigns each voxel the fusion coefficient ``α = L / K``; the fused image
is ``α·foreground + (1 − α)·background`` and the network segments ``L`` (K + 1 classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def random_box_labels(shape: Sequence[int], num_classes: int, box_range: tuple[int, int] = (10, 40),
                      size_fraction_min: Sequence[float] = (0.0625, 0.0625, 0.125),
                      size_fraction_max: Sequence[float] = (0.625, 0.625, 0.625), min_side: int = 4,
                      generator: torch.Generator | None = None) -> Tensor:
    """Paper generator (PyMIC ``volume_fusion``): per sample, M ~ U{box_range} boxes with a class in {1…K}.

    ``shape`` is ``B, X, Y, Z`` (RAS tensor order). Box sides are fractions of the patch (8/128–80/128
    in-plane, 8/64–40/64 along z: the official values for 128×128 slices × 64), at least ``min_side`` voxels; centres are uniform and
    boxes are clipped at the border (official); later boxes overwrite earlier ones; class 0 stays
    outside every box.
    """
    if num_classes < 2:
        raise ValueError(f"volume fusion needs at least 2 classes (K ≥ 1), got {num_classes}")
    b, *spatial = (int(s) for s in shape)
    labels = torch.zeros(b, *spatial, dtype=torch.long)
    low = [max(min_side, int(f * s)) for f, s in zip(size_fraction_min, spatial)]
    high = [max(lo, int(f * s)) for lo, f, s in zip(low, size_fraction_max, spatial)]
    for n in range(b):
        boxes = int(torch.randint(box_range[0], box_range[1] + 1, (1,), generator=generator))
        for _ in range(boxes):
            region = []
            for s, lo, hi in zip(spatial, low, high):
                side = int(torch.randint(lo, hi + 1, (1,), generator=generator))
                centre = int(torch.randint(0, s, (1,), generator=generator))
                start = max(0, centre - side // 2)
                region.append(slice(start, min(s, centre - side // 2 + side)))
            labels[(n, *region)] = int(torch.randint(1, num_classes, (1,), generator=generator))
    return labels


def grid_block_labels(shape: Sequence[int], num_classes: int, block_min: Sequence[int] = (8, 8, 5),
                      block_max: Sequence[int] = (32, 32, 20), fraction: float = 0.7,
                      generator: torch.Generator | None = None) -> Tensor:
    """Current-PyMIC generator (``crop4vf.VolumeFusion``): one block size per sample tiles the patch as a
    grid with a random offset; ⌊fraction · cells⌋ random cells get a class in {1…K}, the rest 0."""
    b, *spatial = (int(s) for s in shape)
    labels = torch.zeros(b, *spatial, dtype=torch.long)
    for n in range(b):
        sides = [min(s, int(torch.randint(lo, hi + 1, (1,), generator=generator)))
                 for s, lo, hi in zip(spatial, block_min, block_max)]
        offsets = [int(torch.randint(0, s % side + 1, (1,), generator=generator)) for s, side in zip(spatial, sides)]
        counts = [(s - o) // side for s, o, side in zip(spatial, offsets, sides)]
        cells = counts[0] * counts[1] * counts[2]
        chosen = torch.randperm(cells, generator=generator)[: int(fraction * cells)]
        classes = torch.randint(1, num_classes, (len(chosen),), generator=generator)
        for cell, cls in zip(chosen.tolist(), classes.tolist()):
            index = (cell // (counts[1] * counts[2]), cell // counts[2] % counts[1], cell % counts[2])
            region = tuple(slice(o + i * side, o + (i + 1) * side) for o, i, side in zip(offsets, index, sides))
            labels[(n, *region)] = cls
    return labels


def fuse(foreground: Tensor, background: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``α·foreground + (1 − α)·background`` with ``α = labels / K`` (``labels``: ``B, D, H, W``)."""
    alpha = (labels.to(foreground.dtype) / (num_classes - 1)).unsqueeze(1)
    return alpha * foreground + (1 - alpha) * background
