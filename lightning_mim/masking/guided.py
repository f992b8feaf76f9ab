"""Score-guided ("easy-to-hard") masks shared by HPM/SelfMedHPM and AnatoMask (methods.md §2.2 item 4).

Both official versions build this mask with a Python loop over the batch and a NumPy round trip on
the CPU every step. Here it is one batched ``topk`` on the scores' device: the hardest patches get a
priority above every random draw, so a single top-``N`` selection takes all of them first and fills
the remaining slots uniformly at random from the other patches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class GuidedMask(NamedTuple):
    """``mask``: ``B, L`` (True = masked); ``hard``: the subset chosen by score (True = hard patch)."""

    mask: Tensor
    hard: Tensor

    def hard_share(self) -> Tensor:
        """Share of the masked patches that were chosen by score, averaged over the batch."""
        return self.hard.sum(dim=1).float().mean() / self.mask.sum(dim=1).float().mean().clamp_min(1.0)


def num_hard_patches(num_masked: int, hard_fraction: float) -> int:
    """``floor(N·α)`` — how many of the ``N`` masked patches are taken by score."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"the hard-patch fraction must be in [0, 1], got {hard_fraction}")
    # The epsilon keeps exact products such as 0.5·216 from flooring to 107 through float error.
    return int(math.floor(num_masked * hard_fraction + 1e-9))


def guided_mask(
    scores: Tensor,
    num_masked: int,
    hard_fraction: float,
    *,
    generator: torch.Generator | None = None,
) -> GuidedMask:
    """Mask the ``floor(N·α)`` highest-scoring patches of each sample plus ``N − n_hard`` random others.

    Args:
        scores: ``B, L`` per-patch difficulty (teacher predicted loss for HPM, teacher
            reconstruction loss for AnatoMask); only its ordering matters. Ties among the top scores
            are broken by ``topk``.
        num_masked: ``N``, masked patches per sample (identical for every sample).
        hard_fraction: ``α`` in ``[0, 1]``; ``α`` giving zero hard patches yields a fully random mask.
        generator: optional ``torch.Generator`` on the scores' device, for reproducible draws.

    Every sample gets exactly ``N`` masked patches, of which exactly ``n_hard`` are its top-scored ones.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be B x L, got shape {tuple(scores.shape)}")
    batch, total = scores.shape
    if not 0 <= num_masked <= total:
        raise ValueError(f"cannot mask {num_masked} of {total} patches")
    n_hard = num_hard_patches(num_masked, hard_fraction)
    # Priorities: uniform noise in [0, 1) for everyone, 2 for the hard patches → they come first.
    priority = torch.rand(batch, total, device=scores.device, generator=generator)
    hard = torch.zeros(batch, total, dtype=torch.bool, device=scores.device)
    if n_hard > 0:
        top = scores.detach().float().topk(n_hard, dim=1).indices
        hard.scatter_(1, top, True)
        priority = priority.masked_fill(hard, 2.0)
    chosen = priority.topk(num_masked, dim=1).indices
    mask = torch.zeros(batch, total, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, chosen, True)
    return GuidedMask(mask, hard)
