"""MAE-3D (He et al. 2022, 3D as in SelfMedMAE): the encoder sees visible tokens only."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mim.backbones.vit import ViT3D, unetr_encoder_export
from lightning_mim.heads.mae_decoder import MAEDecoder
from lightning_mim.losses.reconstruction import masked_patch_loss
from lightning_mim.masking.grid import patchify
from lightning_mim.masking.random import num_masked, random_mask, visible_indices
from lightning_mim.masking.visuals import reconstruction_visuals
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput


def masked_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the masked tokens of a ``B, L`` mask with equal counts per row, in token order."""
    return visible_indices(~mask)


class MAE3D(MIMModule):
    """Masked autoencoder on a ViT-3D.

    Args:
        img_size: input side (or sizes) the networks are built for; must equal the data's patch size.
        in_channels: image channels.
        patch_size: token patch side (16 → 6³ tokens at 96³).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, use_cls_token: encoder ViT.
        decoder_dim, decoder_depth, decoder_heads: MAE decoder (SelfMedMAE: 384 / 8 / 12).
        mask_ratio: fraction of tokens hidden; kept count is ``floor(L·(1-r))`` as in MAE.
        norm_pix_loss: regress per-patch normalised voxels.
        norm_pix_unbiased: unbiased patch variance (MAE) instead of the biased LayerNorm (SelfMedMAE).
        **kwargs: optimisation arguments of :class:`MIMModule` (lr, weight_decay, betas, warm-up...).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 96,
        in_channels: int = 1,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_cls_token: bool = True,
        decoder_dim: int = 384,
        decoder_depth: int = 8,
        decoder_heads: int = 12,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        norm_pix_unbiased: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = ViT3D(img_size, patch_size, in_channels, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                             drop_path_rate, use_cls_token)
        self.decoder = MAEDecoder(embed_dim, self.encoder.grid, patch_size**3 * in_channels, decoder_dim, decoder_depth,
                                  decoder_heads, mlp_ratio)
        self.mask_ratio = mask_ratio
        self.num_masked = num_masked(self.encoder.num_patches, mask_ratio, "floor", by_keep=True)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.encoder.img_size

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

    def export_encoder(self) -> ExportedEncoder:
        """The ViT encoder for MONAI ``UNETR`` (``vit.*`` keys; sin-cos table copied into the learned positions).

        Raises with the reason when UNETR cannot hold this ViT (it hard-codes 12 blocks and 16³ patches).
        """
        state_dict, network_kwargs = unetr_encoder_export(self.encoder)
        metadata = {"method": "mae3d", "patch_size": self.encoder.patch_size, "roi_size": list(self.encoder.img_size),
                    "mask_ratio": self.mask_ratio}
        return ExportedEncoder("unetr", state_dict, network_kwargs, metadata)
