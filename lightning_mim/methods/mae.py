"""MAE-3D (He et al. 2022, 3D as in SelfMedMAE): the encoder sees visible tokens only."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mim.losses.reconstruction import masked_patch_loss
from lightning_mim.masking.grid import patchify
from lightning_mim.masking.random import masked_indices, random_mask, visible_indices
from lightning_mim.masking.visuals import reconstruction_visuals
from lightning_mim.methods.base import StepOutput
from lightning_mim.methods.mae_base import MaskedAutoencoderBase


class MAE3D(MaskedAutoencoderBase):
    """Masked autoencoder on a ViT-3D: norm-pix MSE on the masked patches.

    Its arguments are those of :class:`MaskedAutoencoderBase` (ViT, decoder, ``mask_ratio``, norm-pix target)
    and the optimisation arguments of :class:`MIMModule`.
    """

    export_name = "mae3d"

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output (``B, L, p³C``) and encoder tokens for a ``B, L`` mask."""
        visible = visible_indices(mask)
        latent = self.encoder(images, visible)
        return self.decoder(latent, visible, self.encoder.num_prefix_tokens), latent

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        enc = self.encoder
        mask = random_mask(images.shape[0], enc.num_patches, self.num_masked, device=images.device)
        target = patchify(images, enc.patch_size)
        visuals = {}
        if self.capture_visuals:  # the panels need every token's prediction
            pred, _ = self.reconstruct(images, mask)
            visuals = reconstruction_visuals(images, pred, mask, enc.patch_size, enc.grid, self.hparams.norm_pix_loss)
        else:
            # The loss averages over masked tokens only: predict, normalise and compare just those (the
            # same loss and gradients; the head and the target statistics skip the visible quarter).
            visible, hidden = visible_indices(mask), masked_indices(mask)
            pred = self.decoder(enc(images, visible), visible, enc.num_prefix_tokens, outputs=hidden)
            target = torch.gather(target, 1, hidden.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        loss_mask = mask if self.capture_visuals else torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        loss, _ = masked_patch_loss(pred, target, loss_mask, "l2", self.hparams.norm_pix_loss,
                                    self.hparams.norm_pix_unbiased)
        return StepOutput(losses={"loss": loss, "reconstruction": loss.detach()}, visuals=visuals,
                          scalars={"mask_ratio": mask.float().mean()})
