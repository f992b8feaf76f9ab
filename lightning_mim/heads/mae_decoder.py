"""MAE decoder: re-inserts mask tokens in token order and predicts per-token outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightning_mim.backbones.vit import LAYER_NORM, sincos_position_embedding_3d


class MAEDecoder(nn.Module):
    """Linear embed from the encoder width, learnable mask token, fixed sin-cos positions, blocks, linear out.

    ``out_dim`` is ``p³·C`` for pixel reconstruction, or 1 for a per-token loss predictor (HPM).
    """

    def __init__(
        self,
        encoder_dim: int,
        grid: Sequence[int],
        out_dim: int,
        embed_dim: int = 384,
        depth: int = 8,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_position_embedding_3d(self.grid, embed_dim).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, visible: Tensor | None, num_prefix_tokens: int = 0,
                outputs: Tensor | None = None) -> Tensor:
        """``latent``: encoder output (prefix tokens first); ``visible``: ``B, n`` token indices or None
        when the encoder saw every token. Returns ``B, L, out_dim`` in token order (prefix dropped), or
        with ``outputs`` (``B, m`` token indices) only those tokens' predictions, ``B, m, out_dim``: the
        final norm and head are per token, so skipping the others changes nothing for the ones kept."""
        x = self.embed(latent[:, num_prefix_tokens:])
        b, length = x.shape[0], self.pos_embed.shape[1]
        if visible is not None:
            full = self.mask_token.to(x.dtype).expand(b, length, -1).clone()
            full.scatter_(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
            x = full
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        if outputs is not None:
            x = torch.gather(x, 1, outputs.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.head(self.norm(x))
