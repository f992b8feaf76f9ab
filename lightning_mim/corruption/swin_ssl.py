"""Swin UNETR SSL corruptions (Tang et al. 2022; methods-more §6.4): rotation with labels, cutout with noise and paste."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

RotationPlane = Literal["code", "axial"]
#: Tensor dims (of ``B, C, X, Y, Z``) spanned by each rotation plane: the official code rotates spatial axes
#: 1 and 2 (a plane containing the slice axis); ``axial`` rotates axes 0 and 1 (in-plane).
ROTATION_DIMS: dict[str, tuple[int, int]] = {"code": (3, 4), "axial": (2, 3)}


def rotate90(images: Tensor, turns: Tensor, plane: RotationPlane = "code") -> Tensor:
    """Rotate sample ``b`` of ``B, C, X, Y, Z`` by ``turns[b] · 90°`` in ``plane``."""
    dims = ROTATION_DIMS[plane]
    if images.shape[dims[0]] != images.shape[dims[1]]:
        raise ValueError(f"a 90° rotation in the {plane!r} plane needs equal sides on dims {dims}, got {tuple(images.shape)}")
    return torch.stack([torch.rot90(image, int(k), (dims[0] - 1, dims[1] - 1)) for image, k in zip(images, turns)])


def random_rotation(images: Tensor, generator: torch.Generator | None = None,
                    plane: RotationPlane = "code") -> tuple[Tensor, Tensor]:
    """``(rotated images, labels k ∈ {0, 1, 2, 3})`` with k uniform per sample."""
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    return rotate90(images, turns, plane), turns.to(images.device)


def _random_box(spatial, generator: torch.Generator | None) -> tuple[slice, ...]:
    """Origin uniform in ``{0 … S − ⌊0.05S⌋ − 1}``, extent uniform in ``{⌊0.05S⌋ … ⌊0.25S⌋ − 1}``, clipped."""
    box = []
    for s in spatial:
        low = max(1, s // 20)
        high = max(low + 1, s // 4)
        origin = int(torch.randint(0, max(1, s - low), (1,), generator=generator))
        extent = int(torch.randint(low, high, (1,), generator=generator))
        box.append(slice(origin, min(s, origin + extent)))
    return tuple(box)


def drop_boxes(image: Tensor, max_fraction: float, generator: torch.Generator | None,
               source: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Corrupt random boxes of one ``C, X, Y, Z`` crop until their summed volume reaches U(0, max_fraction)·N.

    Each box is filled with Gaussian noise min–max normalised to [0, 1] inside the box, or, with
    ``source``, with the same-location voxels of ``source`` (the paste). Returns the crop and the
    voxel mask of what was changed.
    """
    out = image.clone()
    changed = torch.zeros(image.shape[1:], dtype=torch.bool, device=image.device)
    spatial = image.shape[1:]
    target = float(torch.rand((), generator=generator)) * max_fraction * spatial.numel()
    covered = 0
    while covered < target:
        box = _random_box(spatial, generator)
        region = (slice(None), *box)
        if source is None:
            noise = torch.randn(out[region].shape, generator=generator).to(out)
            out[region] = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)
        else:
            out[region] = source[region]
        changed[box] = True
        covered += changed[box].numel()
    return out, changed


def cutout(images: Tensor, generator: torch.Generator | None = None, max_fraction: float = 0.3,
           legacy_partner: bool = False, allow_no_partner: bool = False) -> tuple[Tensor, Tensor]:
    """Swin UNETR SSL ``aug_rand``: noise boxes, then boxes pasted from another crop of the batch.

    The partner of crop i is uniform over the *other* crops of the clean batch (fix of defect 6);
    ``legacy_partner`` reproduces the code: uniform over all crops (no paste when it is i itself),
    read from the batch as it is being corrupted. A batch of one has no partner: an error, or with
    ``allow_no_partner`` (a last validation batch) noise boxes only. Returns ``(corrupted, changed-voxel mask B, 1, X, Y, Z)``.
    """
    n = images.shape[0]
    out = images.clone()
    masks = torch.zeros(n, 1, *images.shape[2:], dtype=torch.bool, device=images.device)
    for i in range(n):
        out[i], changed = drop_boxes(images[i], max_fraction, generator)
        masks[i, 0] |= changed
        if legacy_partner:
            j = int(torch.randint(0, n, (1,), generator=generator))
            if j == i:
                continue
            source = out[j]
        else:
            if n < 2:
                if allow_no_partner:
                    continue
                raise ValueError("the cutout paste needs another crop in the batch: use at least 2 crops per process")
            j = (i + int(torch.randint(1, n, (1,), generator=generator))) % n
            source = images[j]
        out[i], changed = drop_boxes(out[i], max_fraction, generator, source=source)
        masks[i, 0] |= changed
    return out, masks
