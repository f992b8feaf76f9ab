"""Masked pixel losses, with the per-patch loss maps AnatoMask and HPM need."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def normalize_patches(patches: Tensor, unbiased: bool = True, eps: float = 1e-6) -> Tensor:
    """Per-patch normalised target ``(x − mean) / sqrt(var + eps)`` over the last dimension.

    MAE/HPM/SparK use the unbiased variance; SelfMedMAE's non-affine LayerNorm is the biased one.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (patches - mean) / torch.sqrt(var + eps)


def per_patch_loss(pred: Tensor, target: Tensor, kind: Literal["l1", "l2"] = "l2") -> Tensor:
    """Mean over the voxels of each patch: ``B, L, P`` → ``B, L`` (computed in float32)."""
    diff = pred.float() - target.float()
    return (diff.abs() if kind == "l1" else diff.square()).mean(dim=-1)


def masked_patch_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    kind: Literal["l1", "l2"] = "l2",
    norm_pix: bool = True,
    unbiased: bool = True,
) -> tuple[Tensor, Tensor]:
    """Loss averaged over masked patches (``Σ M_i·ℓ_i / Σ M_i``) and the per-patch map ``ℓ`` (``B, L``).

    ``pred``/``target`` are ``B, L, P`` patches, ``mask`` is ``B, L`` (True = masked). Visible
    patches do not contribute; the map is returned for every patch so callers can rank them.
    """
    if norm_pix:
        target = normalize_patches(target.float(), unbiased=unbiased)
    loss_map = per_patch_loss(pred, target, kind)
    weights = mask.float()
    loss = (loss_map * weights).sum() / weights.sum().clamp_min(1.0)
    return loss, loss_map


def masked_voxel_l1(pred: Tensor, target: Tensor, voxel_mask: Tensor, eps: float = 1e-5) -> Tensor:
    """SimMIM/SMIT masked-image-prediction loss ``Σ|x − x̂|·M / (Σ M + eps) / C`` over the batch.

    ``voxel_mask`` is ``B, 1, D, H, W`` (1 = masked); channels share the mask.
    """
    mask = voxel_mask.float()
    diff = (pred.float() - target.float()).abs() * mask
    return diff.sum() / (mask.sum() + eps) / pred.shape[1]
