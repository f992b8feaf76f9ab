"""Patch-grid utilities shared by every method.

Flattening order (used by patchify, masks, position embeddings and region grouping alike):
tokens are row-major over the spatial grid (axis0, axis1, axis2), i.e. token index
``i = (g0 * G1 + g1) * G2 + g2``; voxels inside a patch are flattened as ``(p0, p1, p2, C)``,
channels last, as in MAE, SelfMedMAE, SparK and HybridMIM.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def grid_shape(spatial: Sequence[int], cell: int) -> tuple[int, int, int]:
    """Number of cells of side ``cell`` along each spatial axis; raises if not divisible."""
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) != 3:
        raise ValueError(f"expected 3 spatial sizes, got {spatial}")
    bad = [s for s in spatial if s % cell]
    if bad:
        raise ValueError(f"spatial size {spatial} is not divisible by the cell size {cell}")
    return spatial[0] // cell, spatial[1] // cell, spatial[2] // cell


def patchify(images: Tensor, patch: int) -> Tensor:
    """``B, C, D, H, W`` → ``B, L, p³·C`` (row-major tokens, ``(p0, p1, p2, C)`` inside a patch)."""
    b, c = images.shape[:2]
    g0, g1, g2 = grid_shape(images.shape[2:], patch)
    x = images.reshape(b, c, g0, patch, g1, patch, g2, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, g0 * g1 * g2, patch**3 * c)


def unpatchify(patches: Tensor, patch: int, grid: Sequence[int], channels: int = 1) -> Tensor:
    """Inverse of :func:`patchify`: ``B, L, p³·C`` → ``B, C, D, H, W``."""
    g0, g1, g2 = (int(g) for g in grid)
    b, length, dim = patches.shape
    if length != g0 * g1 * g2 or dim != patch**3 * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit grid {tuple(grid)} with patch {patch} "
            f"and {channels} channel(s)"
        )
    x = patches.reshape(b, g0, g1, g2, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, g0 * patch, g1 * patch, g2 * patch)


def flatten_mask(mask: Tensor) -> Tensor:
    """``B, G0, G1, G2`` → ``B, L`` in the row-major token order."""
    return mask.reshape(mask.shape[0], -1)


def unflatten_mask(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """``B, L`` → ``B, G0, G1, G2``."""
    return mask.reshape(mask.shape[0], *(int(g) for g in grid))


def upsample_mask(mask: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour repeat of a ``B, G0, G1, G2`` grid mask by ``factor`` along each axis.

    Goes from the mask-cell grid to the token grid (factor ``m/p``) or to voxels (factor ``m``).
    """
    if factor == 1:
        return mask
    return (
        mask.repeat_interleave(factor, dim=1)
        .repeat_interleave(factor, dim=2)
        .repeat_interleave(factor, dim=3)
    )


def voxel_mask(cell_mask: Tensor, cell: int) -> Tensor:
    """Cell mask ``B, G0, G1, G2`` → voxel mask ``B, 1, D, H, W`` (float, 1 = masked)."""
    return upsample_mask(cell_mask, cell).unsqueeze(1).float()
