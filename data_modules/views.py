"""View samplers and patch augmentation, applied to each patch after it leaves the queue.

They work on a single ``C x D x H x W`` patch tensor (cheap: patches, never volumes) and draw
randomness only from the ``torch.Generator`` they are given, so a seeded generator reproduces them.

Which sampler for which method:

* :class:`SingleView` - one crop per item (MAE, SimMIM, AnatoMask, SelfMedHPM).
* :class:`OverlappingViews` / :class:`TwoOverlappingViews` - the queue samples a larger context
  patch (SMIT: 128³) and the views are random ``view_size`` crops inside it, so they overlap
  heavily (SMIT, DINO/iBOT-style global crops).
* Two *independent* crops of the same volume as separate batch items (HybridMIM, Swin UNETR
  SSL) need no view sampler: that is the queue's ``samples_per_volume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


def as_triple(size: int | tuple[int, int, int] | list[int], name: str) -> tuple[int, int, int]:
    """``96`` or ``(96, 96, 64)`` as a triple of positive ints."""
    values = tuple(int(v) for v in size) if isinstance(size, (tuple, list)) else (int(size),) * 3
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {size!r}")
    return values


class ViewSampler(Protocol):
    num_views: int

    def __call__(self, patch: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]: ...


class SingleView:
    """The patch itself, as the only view."""

    num_views = 1

    def __call__(self, patch: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [patch]


class OverlappingViews:
    """``num_views`` independent uniformly placed ``view_size`` crops inside one context patch."""

    def __init__(self, view_size: int | tuple[int, int, int], num_views: int):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.view_size = as_triple(view_size, "view_size")
        self.num_views = num_views

    def __call__(self, patch: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        spatial = patch.shape[-3:]
        if any(v > s for v, s in zip(self.view_size, spatial)):
            raise ValueError(f"view size {self.view_size} does not fit in the patch {tuple(spatial)}")
        views = []
        for _ in range(self.num_views):
            starts = [int(torch.randint(s - v + 1, (1,), generator=generator)) for s, v in zip(spatial, self.view_size)]
            (a, b, c), (da, db, dc) = starts, self.view_size
            views.append(patch[..., a : a + da, b : b + db, c : c + dc])
        return views


class TwoOverlappingViews(OverlappingViews):
    """SMIT's views u and v: two random ``view_size`` crops of one context patch."""

    def __init__(self, view_size: int | tuple[int, int, int]):
        super().__init__(view_size, num_views=2)


def build_view_sampler(num_views: int = 1, view_size: int | tuple[int, int, int] | None = None) -> ViewSampler:
    """The sampler for the data-module flags: no ``view_size`` means whole-patch views."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if view_size is None:
        if num_views > 1:
            raise ValueError(
                f"num_views={num_views} needs a view_size smaller than the patch (views would be identical)"
            )
        return SingleView()
    return TwoOverlappingViews(view_size) if num_views == 2 else OverlappingViews(view_size, num_views)


@dataclass(frozen=True)
class PatchAugmentation:
    """Cheap per-view augmentation; all off by default (SMIT and HybridMIM use none).

    Attributes:
        flip_prob: probability of flipping each spatial axis, independently.
        intensity_scale: intensities are multiplied by a factor drawn from ``1 ± intensity_scale``.
        intensity_shift: then shifted by an offset drawn from ``± intensity_shift`` (output units).
    """

    flip_prob: float = 0.0
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ValueError("intensity_scale and intensity_shift must be >= 0")

    def __call__(self, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flips = [axis for axis in (-3, -2, -1) if float(torch.rand((), generator=generator)) < self.flip_prob]
        if flips:
            view = torch.flip(view, flips)
        if self.intensity_scale or self.intensity_shift:
            scale = 1 + self.intensity_scale * (2 * float(torch.rand((), generator=generator)) - 1)
            shift = self.intensity_shift * (2 * float(torch.rand((), generator=generator)) - 1)
            view = view * scale + shift
        return view
