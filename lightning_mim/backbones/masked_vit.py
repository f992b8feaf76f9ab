"""ViT-3D with a learnable mask token substituted *before* the position embedding (iBOT / DINOv2 semantics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.backbones.vit import ViT3D
from lightning_mim.masking.grid import grid_shape


class MaskedViT3D(ViT3D):
    """:class:`ViT3D` that accepts a token mask and inputs of other sizes (local crops).

    Masked tokens become the learnable ``mask_token`` and then receive their position (the
    MONAI-wrapper defect of DINOv2-3D-Med, substituting after the positions, is avoided). Inputs whose
    grid differs from the built one get the position table resized trilinearly (DINO's interpolation).
    The UNETR export (:func:`~lightning_mim.backbones.vit.unetr_encoder_export`) ignores the mask token.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_token: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def remove_mask_token(self) -> None:
        """EMA teachers never see masked input and must not carry the token."""
        self.register_parameter("mask_token", None)

    def positions(self, grid: tuple[int, int, int], dtype: torch.dtype) -> Tensor:
        if grid == tuple(self.grid):
            return self.pos_embed.to(dtype)
        table = self.pos_embed.transpose(1, 2).reshape(1, self.embed_dim, *self.grid)
        table = F.interpolate(table.float(), size=grid, mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2).to(dtype)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Tokens after the final norm (``B, prefix + L, dim``); ``token_mask``: ``B, L`` (True = masked)."""
        grid = grid_shape(x.shape[2:], self.patch_size)
        tokens = self.patch_embed(x)
        if token_mask is not None:
            if self.mask_token is None:
                raise RuntimeError("this ViT has no mask token (EMA teacher copies see unmasked input)")
            tokens = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.positions(grid, tokens.dtype)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
