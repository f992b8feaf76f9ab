"""Panel volumes of masked-reconstruction steps (input, masked input, reconstruction, per-patch heat maps), shared by methods."""

from __future__ import annotations

import torch

from lightning_mim.masking.grid import patchify, unflatten_mask, unpatchify, upsample_mask
from lightning_mim.masking.guided import GuidedMask


def patch_values_to_volume(values: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """``B, L`` per-patch values (or a mask) → ``B, 1, D, H, W`` volume holding each patch's value on its voxels."""
    return upsample_mask(unflatten_mask(values, grid), patch).unsqueeze(1)


def paste_reconstruction(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, grid, norm_pix: bool) -> torch.Tensor:
    """Volume with visible patches from the input and masked ones from the prediction (for panels).

    With a normalised-pixel target the prediction is mapped back with each patch's own mean/std.
    """
    target = patchify(images, patch)
    if norm_pix:
        mean, std = target.mean(-1, keepdim=True), target.std(-1, keepdim=True)
        pred = pred * std + mean
    mixed = torch.where(mask.unsqueeze(-1), pred.to(target.dtype), target)
    return unpatchify(mixed, patch, grid, images.shape[1])


def reconstruction_visuals(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch: int, grid,
                           norm_pix: bool) -> dict[str, torch.Tensor]:
    """Panel volumes of a masked-reconstruction step: the input, the masked input and the reconstruction.

    ``pred`` holds ``B, L, p³C`` patches and ``mask`` is ``B, L`` (True = masked).
    """
    voxel = patch_values_to_volume(mask, grid, patch)
    return {
        "input": images,
        "masked": images * (~voxel),
        "reconstruction": paste_reconstruction(images, pred.detach(), mask, patch, grid, norm_pix),
    }


def guided_mask_visuals(images: torch.Tensor, pred: torch.Tensor, chosen: GuidedMask, scores: torch.Tensor,
                        score_name: str, patch: int, grid, norm_pix: bool) -> dict[str, torch.Tensor]:
    """Panels of a teacher-guided step: :func:`reconstruction_visuals` under ``chosen.mask``, the teacher's
    per-patch ``scores`` as ``heat/<score_name>`` and ``heat/mask`` (0 visible, 1 random, 2 hard)."""
    visuals = reconstruction_visuals(images, pred, chosen.mask, patch, grid, norm_pix)
    visuals[f"heat/{score_name}"] = patch_values_to_volume(scores.detach().float(), grid, patch)
    visuals["heat/mask"] = patch_values_to_volume(chosen.mask.float() + chosen.hard.float(), grid, patch)
    return visuals
