"""Self-distillation cross-entropy with teacher centering and sharpening (DINO / iBOT / SMIT).

The teacher distribution is ``P_T = softmax((t − c) / τ_T)`` with a centre ``c`` (EMA of the
teacher's batch-mean logits) and a schedule-driven temperature ``τ_T``; the student's is
``log softmax(s / τ_S)``. Every value is computed in float32 (bf16 softmax at τ = 0.04 overflows).
The reductions SMIT/iBOT need — masked patch tokens of the same view, global tokens across views —
are plain functions over per-item cross-entropies so that each term can be logged on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def all_reduce_mean(x: Tensor) -> Tensor:
    """Average ``x`` over the ranks when torch.distributed is initialised (in place); else ``x``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class DistillationCE(nn.Module):
    """Cross-entropy ``−Σ_k P_T,k log P_S,k`` per item, with the teacher centre as a buffer.

    Args:
        out_dim: number of prototypes ``K`` (last dimension of the logits).
        student_temp: ``τ_S`` (0.1 in DINO, iBOT and SMIT).
        center_momentum: ``c ← m·c + (1 − m)·mean(t)`` (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student temperature must be positive, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_probs(self, teacher_logits: Tensor, temperature: float) -> Tensor:
        """Centred, sharpened teacher distribution (float32, no gradient)."""
        if temperature <= 0:
            raise ValueError(f"teacher temperature must be positive, got {temperature}")
        return F.softmax((teacher_logits.detach().float() - self.center) / temperature, dim=-1)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """Per-item cross-entropy (all leading dimensions kept)."""
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        return -(teacher_probs * log_probs).sum(dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Move the centre towards the mean teacher logit over every item (all-reduced across ranks)."""
        batch_mean = all_reduce_mean(teacher_logits.detach().float().reshape(-1, self.out_dim).mean(dim=0))
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)


def masked_token_distillation(criterion: DistillationCE, student_logits: Tensor, teacher_probs: Tensor,
                              mask: Tensor) -> Tensor:
    """Same-view patch-token loss over masked tokens (iBOT MIM loss / SMIT MPD).

    ``student_logits``, ``teacher_probs``: ``V, B, L, K``; ``mask``: ``V, B, L`` (True = masked).
    Averaged over the masked tokens of each sample (``max(1, Σ M)``), then over the batch and views.
    """
    ce = criterion(student_logits, teacher_probs)
    weights = mask.float()
    per_sample = (ce * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)
    return per_sample.mean()


def cross_view_distillation(criterion: DistillationCE, student_logits: Tensor, teacher_probs: Tensor,
                            pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """Global-token loss between different views (DINO loss / SMIT ITD), averaged over pairs and batch.

    ``student_logits``: ``V_s, B, K``; ``teacher_probs``: ``V_t, B, K``. ``pairs`` lists
    ``(teacher view, student view)`` indices; by default every ``q ≠ v`` pair of equal stacks.
    """
    if pairs is None:
        if student_logits.shape[0] != teacher_probs.shape[0]:
            raise ValueError("give explicit view pairs when student and teacher see different views")
        views = student_logits.shape[0]
        pairs = [(q, v) for q in range(views) for v in range(views) if q != v]
    if not pairs:
        raise ValueError("cross-view distillation needs at least one (teacher, student) view pair")
    terms = [criterion(student_logits[v], teacher_probs[q]).mean() for q, v in pairs]
    return torch.stack(terms).mean()


def collapse_monitors(probs: Tensor) -> dict[str, Tensor]:
    """Mean entropy of a ``..., K`` distribution and its mean KL divergence to the uniform one.

    Collapse to one prototype drives the entropy to 0; collapse to the uniform distribution drives
    the KL to 0 (``KL(P‖U) = log K − H(P)``).
    """
    probs = probs.detach().float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()
    return {"entropy": entropy, "kl_uniform": math.log(probs.shape[-1]) - entropy}
