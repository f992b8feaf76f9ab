"""Models Genesis corruptions (Zhou et al. 2019/2021; methods-more §2.4), batched on tensors in [0, 1].

Each function takes ``B, C, D, H, W`` images and a ``torch.Generator`` and returns a new tensor; the
per-sample decisions (which transform, which boxes) are drawn from the generator, so a seeded
generator reproduces a corruption. :func:`genesis_corrupt` composes them in the official order
(flip of input and target, local shuffle, Bézier intensity, in-/out-painting). Inputs outside [0, 1]
(z-scored data) are first mapped there with :func:`to_unit_range`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Voxel count of the official 64 × 64 × 32 cube, for which 10,000 shuffle blocks are drawn.
GENESIS_CUBE_VOXELS = 64 * 64 * 32


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


# --------------------------------------------------------------------------- Bézier intensity
def bezier_curve(control: Tensor, t: Tensor) -> Tensor:
    """Points of the cubic Bézier curve with control points ``control`` (``4, 2``) at parameters ``t``: ``T, 2``."""
    t = t.reshape(-1, 1).to(control.dtype)
    weights = torch.cat([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)
    return weights @ control


def bezier_intensity(image: Tensor, p1: Sequence[float], p2: Sequence[float], invert: bool,
                     num_points: int = 100_000) -> Tensor:
    """Map intensities through the curve P0 = (0, 0), P1, P2, P3 = (1, 1), piecewise linearly.

    The curve is sampled at ``num_points`` parameters and the abscissae sorted; the ordinates are
    sorted too (an increasing map) or, with ``invert``, kept in reverse curve order (a decreasing,
    intensity-inverting map) — the official two cases. Inputs outside [0, 1] take the end values.
    """
    control = torch.tensor([[0.0, 0.0], list(p1), list(p2), [1.0, 1.0]], dtype=torch.float64)
    points = bezier_curve(control, torch.linspace(0, 1, num_points, dtype=torch.float64))
    xs = points[:, 0].sort().values
    ys = points[:, 1].flip(0) if invert else points[:, 1].sort().values
    return interpolate(image, xs.to(image.device), ys.to(image.device))


def interpolate(values: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """``numpy.interp`` on tensors: piecewise-linear through ``(xs, ys)`` (xs ascending), ends held."""
    flat = values.reshape(-1).to(xs.dtype)
    index = torch.searchsorted(xs, flat).clamp(1, xs.numel() - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    span = (x1 - x0).clamp_min(1e-12)
    out = y0 + (flat - x0) / span * (y1 - y0)
    out = torch.where(flat <= xs[0], ys[0], torch.where(flat >= xs[-1], ys[-1], out))
    return out.reshape(values.shape).to(values.dtype)


# --------------------------------------------------------------------------- local shuffle
def local_shuffle(image: Tensor, num_blocks: int, generator: torch.Generator | None = None,
                  max_fraction: float = 0.1) -> Tensor:
    """Shuffle the voxels inside ``num_blocks`` random small blocks of one ``C, D, H, W`` sample.

    Block sides are uniform in ``{1, …, ⌊S/10⌋}`` per axis, placed uniformly; every block reads the
    *unshuffled* image and later blocks overwrite earlier ones (official semantics), all channels
    move together. Vectorised: one index map, the last block covering a voxel wins.
    """
    spatial = image.shape[1:]
    max_side = [max(1, int(s * max_fraction)) for s in spatial]
    device = image.device
    sides = torch.stack([torch.randint(1, m + 1, (num_blocks,), generator=generator) for m in max_side], 1)
    origins = torch.stack([
        (torch.rand(num_blocks, generator=generator) * (s - sides[:, a] + 1)).floor().long()
        for a, s in enumerate(spatial)
    ], 1)
    offsets = torch.stack(torch.meshgrid(*[torch.arange(m) for m in max_side], indexing="ij"), -1).reshape(-1, 3)
    valid = (offsets.unsqueeze(0) < sides.unsqueeze(1)).all(-1)  # N, M
    m = offsets.shape[0]
    position = torch.arange(m).expand(num_blocks, m)
    big = torch.full_like(position, m)
    natural = torch.where(valid, position, big).argsort(dim=1)  # valid offsets first, in order
    keys = torch.where(valid, torch.rand(num_blocks, m, generator=generator), torch.full((num_blocks, m), 2.0))
    shuffled = keys.argsort(dim=1)  # a random order of the valid offsets
    keep = torch.arange(m).unsqueeze(0) < valid.sum(1, keepdim=True)
    strides = torch.tensor([spatial[1] * spatial[2], spatial[2], 1])

    def flat(order: Tensor) -> Tensor:
        coords = origins.unsqueeze(1) + offsets[order]  # N, M, 3
        return (coords * strides).sum(-1)

    dst, src = flat(natural)[keep], flat(shuffled)[keep]
    block = torch.arange(num_blocks).unsqueeze(1).expand(num_blocks, m)[keep]
    voxels = spatial[0] * spatial[1] * spatial[2]
    winner = torch.full((voxels,), -1, dtype=torch.long).scatter_reduce(0, dst, block, "amax")
    last = block == winner[dst]
    index = torch.arange(voxels)
    index[dst[last]] = src[last]
    flat_image = image.reshape(image.shape[0], -1)
    return flat_image[:, index.to(device)].reshape(image.shape)


# --------------------------------------------------------------------------- painting
def _box(spatial: Sequence[int], low: Sequence[int], high: Sequence[int], margin: int,
         generator: torch.Generator | None) -> tuple[slice, ...]:
    """A box with sides uniform in ``[low, high]`` and origin uniform in ``{margin, …, S − side − margin}``."""
    slices = []
    for s, lo, hi in zip(spatial, low, high):
        side = _randint(lo, hi, generator)
        start = _randint(margin, max(margin, s - side - margin), generator)
        slices.append(slice(start, start + side))
    return tuple(slices)


def in_painting(image: Tensor, generator: torch.Generator | None = None, max_boxes: int = 5,
                continue_prob: float = 0.95) -> Tensor:
    """Up to ``max_boxes`` boxes (each added while U < 0.95) of side S/6–S/3 filled with U[0, 1) noise."""
    out = image.clone()
    spatial = image.shape[1:]
    for _ in range(max_boxes):
        if _uniform(generator) >= continue_prob:
            break
        box = _box(spatial, [s // 6 for s in spatial], [s // 3 for s in spatial], 3, generator)
        size = [b.stop - b.start for b in box]
        out[(slice(None), *box)] = torch.rand(size, generator=generator).to(out)
    return out


def out_painting(image: Tensor, generator: torch.Generator | None = None, max_extra_boxes: int = 4,
                 continue_prob: float = 0.95) -> Tensor:
    """U[0, 1) noise everywhere except 1 + up to 4 windows (side S − U{3S/7 … 4S/7}) of the original."""
    out = torch.rand(image.shape[1:], generator=generator).to(image).expand_as(image).clone()
    spatial = image.shape[1:]
    low = [s - 4 * s // 7 for s in spatial]
    high = [s - 3 * s // 7 for s in spatial]
    for index in range(1 + max_extra_boxes):
        if index and _uniform(generator) >= continue_prob:
            break
        box = (slice(None), *_box(spatial, low, high, 3, generator))
        out[box] = image[box]
    return out


# --------------------------------------------------------------------------- composition
@dataclass(frozen=True)
class GenesisConfig:
    """Probabilities of the official ``generate_pair`` (``pytorch/config.py``).

    Attributes:
        flip_rate: each of up to 3 flips happens while U < ``flip_rate``.
        legacy_flip_axes: draw the flip axis from {channel, 1st, 2nd spatial} as the official code
            (a no-op on the channel; the last spatial axis is never flipped). Default: the 3 spatial axes.
        local_rate: probability of local shuffling.
        shuffle_blocks: blocks per 64 × 64 × 32 voxels (scaled to the patch volume, capped at 4×).
        nonlinear_rate: probability of the Bézier map; half of those maps invert.
        paint_rate: probability of painting; inside it, in-painting with ``inpaint_rate``, else out-painting.
        inpaint_rate: 1 − outpaint rate 0.8.
    """

    flip_rate: float = 0.4
    legacy_flip_axes: bool = False
    local_rate: float = 0.5
    shuffle_blocks: int = 10_000
    nonlinear_rate: float = 0.9
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2


def shuffle_block_count(spatial: Sequence[int], per_cube: int) -> int:
    voxels = 1
    for s in spatial:
        voxels *= int(s)
    return max(1, min(4 * per_cube, round(per_cube * voxels / GENESIS_CUBE_VOXELS)))


def genesis_corrupt(images: Tensor, config: GenesisConfig, generator: torch.Generator | None = None,
                    ) -> tuple[Tensor, Tensor, list[dict[str, bool]]]:
    """``(corrupted input, target, per-sample record of the applied transforms)`` for ``B, C, D, H, W``.

    The target is the image after the flips (they act on input and target alike).
    """
    inputs, targets, record = [], [], []
    blocks = shuffle_block_count(images.shape[2:], config.shuffle_blocks)
    for sample in images:
        applied = {"flip": False, "shuffle": False, "bezier": False, "inverted": False, "inpaint": False,
                   "outpaint": False}
        y = sample
        for _ in range(3):
            if _uniform(generator) >= config.flip_rate:
                break
            axis = _randint(0, 2, generator) + (0 if config.legacy_flip_axes else 1)
            if axis > 0:
                y = torch.flip(y, [axis])
                applied["flip"] = True
        x = y
        if _uniform(generator) < config.local_rate:
            x = local_shuffle(x, blocks, generator)
            applied["shuffle"] = True
        if _uniform(generator) < config.nonlinear_rate:
            p1 = (_uniform(generator), _uniform(generator))
            p2 = (_uniform(generator), _uniform(generator))
            invert = _uniform(generator) < 0.5
            x = bezier_intensity(x, p1, p2, invert)
            applied["bezier"], applied["inverted"] = True, invert
        if _uniform(generator) < config.paint_rate:
            if _uniform(generator) < config.inpaint_rate:
                x, applied["inpaint"] = in_painting(x, generator), True
            else:
                x, applied["outpaint"] = out_painting(x, generator), True
        inputs.append(x)
        targets.append(y)
        record.append(applied)
    return torch.stack(inputs), torch.stack(targets), record


#: Tolerance on the [0, 1] check of ``intensity_mapping: unit`` (interpolation / augmentation round-off).
UNIT_TOLERANCE = 1e-3


def to_unit_range(images: Tensor, low_q: float = 0.005, high_q: float = 0.995) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample percentile map to [0, 1] (clipped) and its ``(low, high)`` for mapping back (z-scored data)."""
    flat = images.float().flatten(1)
    low = torch.quantile(flat, low_q, dim=1).view(-1, 1, 1, 1, 1)
    high = torch.quantile(flat, high_q, dim=1).view(-1, 1, 1, 1, 1)
    return ((images - low) / (high - low).clamp_min(1e-6)).clamp(0, 1), low, high
