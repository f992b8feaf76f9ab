"""NT-Xent (SimCLR's normalised-temperature cross-entropy), optionally with negatives from every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenation of ``x`` over all ranks (gradients flow back to each rank's slice) and this rank's index."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank()


def nt_xent(first: Tensor, second: Tensor, temperature: float = 0.5, gather_negatives: bool = False) -> Tensor:
    """Contrastive loss between two ``N, D`` embeddings where row ``i`` of both is the same sample.

    For each of the ``2N`` embeddings the positive is its twin and the candidates are every other
    embedding (itself excluded): ``−log(exp(s⁺/τ) / Σ_{k≠i} exp(s_ik/τ))`` with cosine similarity
    ``s``, averaged over the ``2N`` rows — the SimCLR loss HybridMIM and Swin UNETR SSL use.

    ``gather_negatives`` adds the embeddings of every other rank as negatives (all ranks must
    hold the same ``N``); gradients flow through the gathered copies, and the mean over ranks equals
    the loss of the global batch. It is a no-op outside ``torch.distributed``.
    """
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(f"expected two N×D embeddings of the same shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    a = F.normalize(first.float(), dim=1)
    b = F.normalize(second.float(), dim=1)
    n = a.shape[0]
    if gather_negatives:
        all_a, rank = _gather_with_grad(a)
        all_b, _ = _gather_with_grad(b)
    else:
        all_a, all_b, rank = a, b, 0
    total = all_a.shape[0]
    with torch.autocast(a.device.type, enabled=False):  # similarities / τ in float32 even under bf16 autocast
        logits = torch.cat([a, b]) @ torch.cat([all_a, all_b]).T / temperature  # 2N × 2M
    local = torch.arange(n, device=a.device) + rank * n
    self_index = torch.cat([local, local + total])
    positive_index = torch.cat([local + total, local])
    rows = torch.arange(2 * n, device=a.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=a.device))
    return F.cross_entropy(logits, positive_index)
