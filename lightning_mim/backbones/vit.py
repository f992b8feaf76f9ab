"""ViT-3D built from timm transformer blocks, with a 3D conv patch embedding and fixed sin-cos positions."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightning_mim.masking.grid import grid_shape

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)


def as_triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(size, int):
        return size, size, size
    size = tuple(int(s) for s in size)
    if len(size) != 3:
        raise ValueError(f"expected an int or 3 sizes, got {size}")
    return size  # type: ignore[return-value]


def sincos_position_embedding_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sin-cos table ``L × dim`` in row-major token order.

    ``dim/6`` frequencies per axis, sin and cos for each of the three axes (SelfMedMAE layout).
    """
    if dim % 6:
        raise ValueError(f"the embedding width must be divisible by 6 for 3D sin-cos positions, got {dim}")
    g0, g1, g2 = (int(g) for g in grid)
    coords = torch.meshgrid(
        torch.arange(g0, dtype=torch.float64),
        torch.arange(g1, dtype=torch.float64),
        torch.arange(g2, dtype=torch.float64),
        indexing="ij",
    )
    per_axis = dim // 6
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float64) / per_axis)
    parts = []
    for axis in coords:
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class PatchEmbed3D(nn.Module):
    """Non-overlapping ``p³`` patches → tokens (``B, L, dim``) in row-major order.

    The weights are a ``p³``-stride ``Conv3d`` (the layout MONAI's ViT loads), applied as one
    matrix product on the unfolded patches: identical results, several times faster on CPU than the
    strided convolution, and with ``visible`` only the kept patches are embedded (MAE skips 75%).
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Tokens of every patch, or only of the ``visible`` ones (``B, n`` long indices)."""
        g0, g1, g2 = grid_shape(x.shape[2:], self.patch_size)
        b, c, p = x.shape[0], x.shape[1], self.patch_size
        # (B, C, g0, p, g1, p, g2, p) → (B, g0·g1·g2, C·p³): each row in the flattened Conv3d kernel's order.
        patches = x.reshape(b, c, g0, p, g1, p, g2, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g0 * g1 * g2, -1)
        if visible is not None:
            patches = torch.gather(patches, 1, visible.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class ViT3D(nn.Module):
    """Pre-norm ViT over 3D patches; can run on the visible tokens only (MAE).

    Defaults are ViT-B/16 at 96³ (768 wide, 12 blocks, 12 heads, MLP ratio 4, qkv bias).
    Attention uses timm's fused ``scaled_dot_product_attention`` path.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        patch_size: int = 16,
        in_channels: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        use_cls_token: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = as_triple(img_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.grid = grid_shape(self.img_size, patch_size)
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.patch_embed = PatchEmbed3D(patch_size, in_channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.register_buffer("pos_embed", sincos_position_embedding_3d(self.grid, embed_dim).unsqueeze(0), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rates[i], norm_layer=LAYER_NORM)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Tokens after the final norm: ``B, prefix + n, dim``.

        ``visible`` (``B, n`` long indices, see :func:`lightning_mim.masking.random.visible_indices`)
        keeps only those tokens, so masked tokens never enter the encoder.
        """
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"ViT3D was built for inputs of {self.img_size}, got {tuple(x.shape[2:])}")
        positions = self.pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        if visible is not None:
            positions = torch.gather(positions, 1, visible.unsqueeze(-1).expand(-1, -1, positions.shape[-1]))
        tokens = self.patch_embed(x, visible) + positions
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


# --------------------------------------------------------------------------- export to MONAI
#: timm block parameter → MONAI ``TransformerBlock`` parameter (MONAI ``ViT``/``UNETR.vit`` layout).
_MONAI_BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.out_proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.linear1",
    "mlp.fc2": "mlp.linear2",
}
#: MONAI's UNETR (and the project's any-depth ViTUNETR) cut 16³ token patches.
UNETR_PATCH_SIZE = 16


def monai_vit_state_dict(vit: ViT3D) -> dict[str, Tensor]:
    """``vit``'s weights keyed as MONAI's ``ViT`` (what ``UNETR.vit`` holds); loads with ``strict=True``.

    * the fixed sin-cos table (a non-persistent buffer here) is copied into MONAI's learned
      ``patch_embedding.position_embeddings`` (``1 × L × D``, no cls slot); the cls token is dropped
      (UNETR has none);
    * MONAI allocates a ``norm_cross_attn`` LayerNorm in every block even without cross-attention and
      never calls it; it is written with LayerNorm's initial values so a strict load succeeds.

    Raises when the ViT holds a parameter MONAI's ViT has no place for (e.g. layer scale, qk-norm).
    """
    out: dict[str, Tensor] = {
        "patch_embedding.patch_embeddings.weight": vit.patch_embed.proj.weight,
        "patch_embedding.patch_embeddings.bias": vit.patch_embed.proj.bias,
        "patch_embedding.position_embeddings": vit.pos_embed,
        "norm.weight": vit.norm.weight,
        "norm.bias": vit.norm.bias,
    }
    unmapped = []
    for index, block in enumerate(vit.blocks):
        for name, tensor in block.state_dict(keep_vars=True).items():
            module, _, leaf = name.rpartition(".")
            if module not in _MONAI_BLOCK_NAMES:
                unmapped.append(f"blocks.{index}.{name}")
                continue
            out[f"blocks.{index}.{_MONAI_BLOCK_NAMES[module]}.{leaf}"] = tensor
        out[f"blocks.{index}.norm_cross_attn.weight"] = torch.ones(vit.embed_dim)
        out[f"blocks.{index}.norm_cross_attn.bias"] = torch.zeros(vit.embed_dim)
    if unmapped:
        raise ValueError(f"these ViT3D parameters have no counterpart in MONAI's ViT: {unmapped}")
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def unetr_encoder_export(vit: ViT3D) -> tuple[dict[str, Tensor], dict]:
    """(state dict keyed as MONAI ``UNETR`` — ``vit.*`` —, UNETR constructor arguments) for ``vit``.

    The arguments record ``num_layers``: 12 blocks build MONAI's UNETR, any other depth the
    project's :class:`~lightning_mim.segmentation.networks.ViTUNETR` (same keys). Both cut 16³
    token patches, so another patch size raises with the reason instead of exporting weights nobody
    can use.
    """
    problems = []
    if vit.patch_size != UNETR_PATCH_SIZE:
        problems.append(f"patch size {vit.patch_size} (UNETR always uses {UNETR_PATCH_SIZE}³ patches)")
    first = vit.blocks[0]
    mlp_dim = first.mlp.fc1.out_features
    if problems:
        raise ValueError(
            "this ViT cannot be exported for MONAI UNETR: " + "; ".join(problems)
            + f". Pre-train with patch_size={UNETR_PATCH_SIZE} to fine-tune with UNETR."
        )
    kwargs = {
        "in_channels": vit.in_channels,
        "img_size": list(vit.img_size),
        "hidden_size": vit.embed_dim,
        "num_layers": len(vit.blocks),  # 12: MONAI's UNETR; any other depth: the project's ViTUNETR
        "mlp_dim": int(mlp_dim),
        "num_heads": int(first.attn.num_heads),
        "qkv_bias": first.attn.qkv.bias is not None,
        "proj_type": "conv",
    }
    return {f"vit.{key}": value for key, value in monai_vit_state_dict(vit).items()}, kwargs
