"""Views made inside the step: DINO multi-crop (random-resized 3-D crops of each patch, flips, intensity jitter)
and VoCo's per-crop augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_resized_crops(images: Tensor, count: int, size: int, volume_scale: tuple[float, float],
                         generator: torch.Generator | None = None, flip_prob: float = 0.5,
                         intensity_scale: float = 0.0, intensity_shift: float = 0.0) -> Tensor:
    """``count`` views per sample of ``B, C, X, Y, Z``: ``count·B`` crops (view-major) resized to ``size³``.

    Each crop keeps a volume fraction ``f ~ U(volume_scale)`` of the patch with the same side fraction
    ``f^{1/3}`` on every axis (DINOv2's area scale in 3-D), at a random position, resized trilinearly;
    then flips per axis and a multiplicative / additive intensity jitter.
    """
    low, high = volume_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop volume scale must satisfy 0 < low ≤ high ≤ 1, got {volume_scale}")
    spatial = images.shape[2:]
    views = []
    for _ in range(count):
        for image in images:
            fraction = (low + (high - low) * float(torch.rand((), generator=generator))) ** (1 / 3)
            sides = [max(1, round(s * fraction)) for s in spatial]
            starts = [int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(spatial, sides)]
            crop = image[:, starts[0]: starts[0] + sides[0], starts[1]: starts[1] + sides[1], starts[2]: starts[2] + sides[2]]
            crop = F.interpolate(crop.unsqueeze(0).float(), size=(size,) * 3, mode="trilinear", align_corners=False)[0]
            flips = [axis for axis in (1, 2, 3) if float(torch.rand((), generator=generator)) < flip_prob]
            if flips:
                crop = torch.flip(crop, flips)
            if intensity_scale or intensity_shift:
                scale = 1 + intensity_scale * (2 * float(torch.rand((), generator=generator)) - 1)
                shift = intensity_shift * (2 * float(torch.rand((), generator=generator)) - 1)
                crop = crop * scale + shift
            views.append(crop.to(images.dtype))
    return torch.stack(views)


def augment_crops(crops: Tensor, generator: torch.Generator, flip_prob: float, rotate_prob: float,
                  shift_prob: float, shift: float) -> Tensor:
    """Independent per-crop flips (each axis), in-plane rot90 (k ∈ {1, 2, 3}) and intensity shift (VoCo)."""
    out = []
    for crop in crops:
        flips = [axis for axis in (1, 2, 3) if float(torch.rand((), generator=generator)) < flip_prob]
        if flips:
            crop = torch.flip(crop, flips)
        if float(torch.rand((), generator=generator)) < rotate_prob:
            crop = torch.rot90(crop, int(torch.randint(1, 4, (1,), generator=generator)), (1, 2))
        if float(torch.rand((), generator=generator)) < shift_prob:
            crop = crop + shift * (2 * float(torch.rand((), generator=generator)) - 1)
        out.append(crop)
    return torch.stack(out)
