"""VoCo losses and crop geometry (Wu, Zhuang, Chen; CVPR 2024 and TPAMI code; methods-more §1.4–1.5).

Notation: ``z_r`` random-crop embeddings, ``q_k`` base-crop embeddings of the same volume,
``s_rk = max(0, cos(z_r, q_k))``; ``y_rk`` the fraction of random crop r inside base crop k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

NegativeForm = Literal["log", "square"]
EPS = 1e-6


def base_crop_starts(grid: Sequence[int], crop: Sequence[int]) -> Tensor:
    """Start corners (``K, 3``) of the non-overlapping base crops tiling a ``grid × crop`` region,
    flat index ``k = (i·g1 + j)·g2 + l`` (axis 0 slowest, as the code's ``i·n + j``)."""
    axes = [torch.arange(g) * c for g, c in zip(grid, crop)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def overlap_labels(random_starts: Tensor, grid: Sequence[int], crop: Sequence[int]) -> Tensor:
    """``y_rk``: the fraction of each random crop's volume (``R, 3`` starts, size ``crop``) inside each base crop.

    Rows sum to 1 when the random crops lie inside the region (the code's 2-D area overlap is the
    case of a grid with one cell along z).
    """
    crop_t = torch.tensor(list(crop), dtype=torch.float64)
    bases = base_crop_starts(grid, crop).to(torch.float64)  # K, 3
    r = random_starts.to(torch.float64).unsqueeze(1)  # R, 1, 3
    low = torch.maximum(r, bases.unsqueeze(0))
    high = torch.minimum(r + crop_t, bases.unsqueeze(0) + crop_t)
    inter = (high - low).clamp_min(0).prod(-1)  # R, K
    return (inter / crop_t.prod()).float()


def online_assign(z: Tensor, q: Tensor) -> Tensor:
    """``s = max(0, cos(z_r, q_k))`` for ``… R, D`` and ``… K, D``: ``… R, K`` (cosine eps 1e-8, float32)."""
    z, q = z.float(), q.float()
    dot = z @ q.transpose(-1, -2)
    norms = z.norm(dim=-1, keepdim=True).clamp_min(1e-8) * q.norm(dim=-1).unsqueeze(-2).clamp_min(1e-8)
    return F.relu(dot / norms)


def position_loss(similarity: Tensor, target: Tensor, negative_form: NegativeForm = "log") -> tuple[Tensor, Tensor]:
    """``(L_pos, L_neg)`` for one volume's ``R, K`` similarities and targets (VoCo ``ce_loss``).

    ``L_pos = Σ y·(−log(1 − |y − s| + ε)) / (Σ y + ε)`` (overlap-weighted); on the pairs with ``y = 0``:
    ``log``: ``−log(1 − s + ε)`` (TPAMI code), ``square``: ``s²`` (CVPR code), averaged over them.
    """
    target = target.float()
    pos = (target * -torch.log(1 - (target - similarity).abs() + EPS)).sum() / (target.sum() + EPS)
    negative = (target == 0).float()
    if negative_form == "log":
        neg_terms = -torch.log(1 - similarity + EPS)
    elif negative_form == "square":
        neg_terms = similarity**2
    else:
        raise ValueError(f"negative_form must be 'log' or 'square', got {negative_form!r}")
    neg = (negative * neg_terms).sum() / (negative.sum() + EPS)
    return pos, neg


def orthogonality_loss(bases: Tensor, stop_gradient: bool = True) -> Tensor:
    """``(2 / (K(K−1))) Σ_{k<l} max(0, cos(q_k, sg(q_l)))²`` for one volume's ``K, D`` base embeddings."""
    k = bases.shape[0]
    if k < 2:
        raise ValueError(f"the base-crop regulariser needs at least 2 base crops, got {k}")
    other = bases.detach() if stop_gradient else bases
    cos = online_assign(bases, other)  # K, K
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=bases.device), diagonal=1)
    return (cos[upper] ** 2).sum() * 2.0 / (k * (k - 1))
