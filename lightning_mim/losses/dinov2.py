"""DINOv2 loss blocks (methods-more §5.6): Sinkhorn-Knopp teacher targets, KoLeo, iBOT patch loss with per-image weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(x: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


def gather_rows(x: Tensor) -> Tensor:
    """Rows of every rank concatenated (gradients flow to this rank's rows); ``x`` outside DDP."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


@torch.no_grad()
def all_reduced_mean_rows(rows: Tensor) -> Tensor | None:
    """Mean of ``N, K`` rows over every rank's rows (ranks may hold none); None when no rank holds any."""
    total = rows.detach().float().sum(dim=0)
    count = torch.tensor(float(rows.shape[0]), device=rows.device)
    _all_reduce_sum(total)
    _all_reduce_sum(count)
    return total / count if count > 0 else None


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Teacher targets ``N, K`` (one distribution per row) balanced over the prototypes (SwAV / DINOv2).

    ``Q = exp(t/τ)ᵀ`` normalised to sum 1; then ``iterations`` times: rows (prototypes) to ``1/K`` each,
    columns (samples) to ``1/N_tot`` each; finally ×``N_tot``. Sums and ``N_tot`` are all-reduced
    across ranks, so every rank must call it, even with no rows (a rank without masked tokens).
    Computed in float32; no state (no centre).
    """
    logits = teacher_logits.detach().float()
    shift = logits.max() if logits.numel() else torch.tensor(float("-inf"), device=logits.device)
    if _distributed():  # one shift for every rank, so their columns share a scale
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - shift) / temperature).t()  # K × N (the common shift cancels out)
    k = q.shape[0]
    total = _all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= total
    return (q * total).t()


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko–Leonenko entropy estimator: ``−mean_i log ‖x̂_i − x̂_nn(i)‖`` on L2-normalised rows, in float32."""
    if features.shape[0] < 2:
        raise ValueError("KoLeo needs at least 2 embeddings")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        similarity = x @ x.t()
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        neighbour = similarity.argmax(dim=1)
        distance = F.pairwise_distance(x, x[neighbour], eps=eps)
        return -torch.log(distance + eps).mean()


def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """``Σ_i CE(P_T,i, log softmax(s_i/τ_s)) / (#masked tokens of i's image)``, over masked tokens, / ``N``.

    ``student_logits``, ``teacher_probs``: ``N, L, K``; ``masks``: ``N, L`` (True = masked). Images
    without masked tokens contribute 0 but still count in ``N`` (DINOv2).
    """
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    ce = -(teacher_probs.float() * log_probs).sum(-1)  # N, L
    weights = masks.float() / masks.float().sum(dim=1, keepdim=True).clamp_min(1.0)
    return (ce * weights).sum() / masks.shape[0]
