"""Panel volumes of a masked-reconstruction step (input, masked input, reconstruction), shared by methods."""

from __future__ import annotations

import torch

from lightning_mim.masking.grid import patchify, unflatten_mask, unpatchify, upsample_mask


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
    voxel = upsample_mask(unflatten_mask(mask, grid), patch).unsqueeze(1)
    return {
        "input": images,
        "masked": images * (~voxel),
        "reconstruction": paste_reconstruction(images, pred.detach(), mask, patch, grid, norm_pix),
    }
