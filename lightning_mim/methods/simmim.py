"""SimMIM-3D (Xie et al. 2022, methods.md §7.2): mask token after embedding, linear pixel-shuffle head, L1."""

from __future__ import annotations

from typing import Any

import torch

from lightning_mim.backbones.swin import MaskedSwinEncoder, SwinConfigName
from lightning_mim.heads.pixel_shuffle import LinearPixelShuffleDecoder
from lightning_mim.losses.reconstruction import masked_voxel_l1
from lightning_mim.masking.grid import voxel_mask
from lightning_mim.masking.random import random_cell_mask
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput


class SimMIM3D(MIMModule):
    """SimMIM on a 3D Swin encoder: the encoder sees every token, masked ones as a learnable vector.

    Masks are drawn on ``mask_cell``³ cells (16³ voxels = 8³ tokens), ``ceil(ratio·G³)`` per sample;
    the stride-32 bottleneck is mapped back to voxels by one 1×1×1 conv + 3D pixel shuffle and the
    L1 loss is taken on masked voxels only.

    Args:
        encoder: ``swin_unetr`` (MONAI Swin UNETR layout) or ``swin_smit``.
        img_size: input side the networks are built for; must equal the data's patch size.
        in_channels: image channels.
        feature_size, depths, num_heads, window_size, qkv_bias, drop_path_rate, drop_rate: overrides
            of the encoder config (None keeps the config's value).
        use_checkpoint: gradient checkpointing in the Swin blocks.
        mask_cell: mask cell side in voxels (multiple of the token patch 2, divides ``img_size``).
        mask_ratio: fraction of cells masked (SimMIM 0.6).
        mask_token_init_std: SimMIM draws the mask token from a 0.02 trunc-normal (0 = zeros).
        normalize_bottleneck: feed the head the non-affine LayerNorm'ed bottleneck (SimMIM applies the
            encoder's final norm before its head; it is also what SwinUNETR's decoder receives).
        **kwargs: optimisation arguments of :class:`MIMModule` (lr, weight_decay, betas, warm-up...).
    """

    def __init__(
        self,
        encoder: SwinConfigName = "swin_unetr",
        img_size: int = 96,
        in_channels: int = 1,
        feature_size: int | None = None,
        depths: list[int] | None = None,
        num_heads: list[int] | None = None,
        window_size: int | None = None,
        qkv_bias: bool | None = None,
        drop_path_rate: float | None = None,
        drop_rate: float | None = None,
        use_checkpoint: bool = False,
        mask_cell: int = 16,
        mask_ratio: float = 0.6,
        mask_token_init_std: float = 0.02,
        normalize_bottleneck: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = MaskedSwinEncoder.from_config(
            encoder, img_size=img_size, in_channels=in_channels, feature_size=feature_size, depths=depths,
            num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            drop_rate=drop_rate, use_checkpoint=use_checkpoint, mask_cell=mask_cell,
            mask_token_init_std=mask_token_init_std,
        )
        self.decoder = LinearPixelShuffleDecoder(self.encoder.stage_channels[-1], self.encoder.total_stride, in_channels)
        self.encoder_config = encoder
        self.mask_ratio = mask_ratio
        self.normalize_bottleneck = normalize_bottleneck

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.encoder.img_size

    def reconstruct(self, images: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
        """Predicted volume (``B, C, D, H, W``) for a ``B, G³`` cell mask."""
        features = self.encoder(images, self.encoder.token_mask(cell_mask), normalize=False)
        return self.decoder(self.encoder.proj_out(features[-1], self.normalize_bottleneck))

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        cell_mask = random_cell_mask(images.shape[0], self.encoder.cell_grid, self.mask_ratio, device=images.device)
        pred = self.reconstruct(images, cell_mask)
        voxels = voxel_mask(cell_mask, self.encoder.mask_cell)
        loss = masked_voxel_l1(pred, images, voxels)
        visuals = {}
        if self.capture_visuals:
            first = voxels[:1].bool()
            visuals = {
                "input": images[:1],
                "masked": images[:1] * ~first,
                "reconstruction": torch.where(first, pred[:1].detach().to(images.dtype), images[:1]),
            }
        return StepOutput(losses={"loss": loss, "mip": loss.detach()}, visuals=visuals,
                          scalars={"mask_ratio": cell_mask.float().mean()})

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(
            target="swin_unetr",
            state_dict=self.encoder.swin_unetr_state_dict(),
            network_kwargs=self.encoder.swin_unetr_kwargs(),
            metadata={"method": "SimMIM3D", "encoder_config": self.encoder_config, "img_size": list(self.input_size)},
        )
