"""3D Swin encoder: MONAI's ``SwinTransformer`` plus a learnable mask token after patch embedding.

Grid hierarchy (methods.md §1). For an input of side ``S`` (96 by default):

* voxels: ``S³``;
* tokens: the patch embedding (stride ``p = 2``) gives ``(S/p)³`` tokens (48³), where the mask token
  is swapped in (SimMIM / SMIT "mask token after embed");
* mask cells: masks are drawn on a coarser grid of cells of side ``m`` voxels (``m = 16`` → 6³
  cells) and repeated ``m/p`` times per axis to reach the token grid (and ``m`` times for voxels),
  so ``m`` must be a multiple of ``p`` and divide ``S``;
* stages: four Swin stages, each followed by patch merging, halve the grid: a 96³ input yields
  48³×F, 24³×2F, 12³×4F, 6³×8F, 3³×16F. ``S`` must therefore be divisible by ``p·2⁴`` (32).
  At ``m = p·2³`` the fourth feature map (6³×8F, the output of the third merging) has exactly one
  token per mask cell — SMIT's distillation tap.

Weights keep MONAI's key layout (``patch_embed.*``, ``layers1.0.*`` …), so the encoder state dict
without ``mask_token`` loads strictly into ``monai.networks.nets.SwinUNETR(...).swinViT``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import Tensor, nn

from lightning_mim.backbones.vit import as_triple
from lightning_mim.masking.grid import grid_shape, upsample_mask

SwinConfigName = Literal["swin_smit", "swin_unetr"]
NUM_STAGES = 4


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a 4-stage 3D Swin encoder (names follow MONAI ``SwinUNETR``)."""

    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    qkv_bias: bool = True
    patch_norm: bool = False
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    mlp_ratio: float = 4.0
    patch_size: int = 2


SWIN_CONFIGS: dict[str, SwinConfig] = {
    # SMIT (methods.md §3.2): 4 heads in every stage, window 4³, no qkv bias, LayerNorm after the
    # patch embedding, stochastic depth up to 0.3.
    "swin_smit": SwinConfig(depths=(2, 2, 4, 2), num_heads=(4, 4, 4, 4), window_size=4, qkv_bias=False,
                            patch_norm=True, drop_path_rate=0.3),
    # MONAI Swin UNETR / Swin UNETR SSL / HybridMIM (methods.md §2.3, §6.2) at feature size 48.
    "swin_unetr": SwinConfig(),
}


class MaskedSwinEncoder(SwinTransformer):
    """MONAI ``SwinTransformer`` whose embedded tokens can be replaced by a learnable mask token.

    Use :meth:`from_config` to build ``swin_smit`` or ``swin_unetr`` with overrides. ``forward``
    returns the five feature maps (``B, C, d, h, w``) like MONAI's; with ``normalize=True`` each is
    passed through a non-affine LayerNorm, which is what ``SwinUNETR`` feeds its decoder.

    Args:
        img_size: input side(s) the encoder is built for; validated against ``p·2⁴``.
        in_channels: image channels.
        feature_size: embedding width F.
        depths, num_heads: blocks and heads per stage (4 stages).
        window_size: attention window side.
        patch_size: token patch side p.
        qkv_bias, mlp_ratio, drop_rate, attn_drop_rate, drop_path_rate, patch_norm: as in MONAI.
        mask_cell: side of the mask cells in voxels (validated: multiple of ``p``, divides the input);
            None when the encoder is used without masking (e.g. HybridMIM's voxel fill).
        mask_token_init_std: 0 gives SMIT's zero-initialised token; SimMIM uses a 0.02 trunc-normal.
        use_checkpoint: gradient checkpointing in every block (GPU memory).
        use_flash_attention: MONAI's SDPA path, taken only when autograd is off (EMA teachers,
            inference); same results, less memory — but it skips attention dropout, so turn it off
            when a train-mode pass under ``no_grad`` must draw that dropout (HybridMIM's twin).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_norm: bool = False,
        mask_cell: int | None = None,
        mask_token_init_std: float = 0.0,
        use_checkpoint: bool = False,
        use_flash_attention: bool = True,
    ) -> None:
        depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
        if len(depths) != NUM_STAGES or len(num_heads) != NUM_STAGES:
            raise ValueError(f"MONAI's Swin encoder has {NUM_STAGES} stages; got depths {depths}, heads {num_heads}")
        for stage, heads in enumerate(num_heads):
            width = feature_size * 2**stage
            if width % heads:
                raise ValueError(f"stage {stage} width {width} is not divisible by its {heads} heads")
        size, total_stride = as_triple(img_size), patch_size * 2**NUM_STAGES
        if any(s % total_stride for s in size):
            raise ValueError(
                f"input size {size} must be divisible by patch size × 2^{NUM_STAGES} = {total_stride} "
                f"(patch embedding then {NUM_STAGES} patch mergings)"
            )
        if mask_cell is not None:
            if mask_cell % patch_size:
                raise ValueError(f"mask cell {mask_cell} must be a multiple of the token patch {patch_size}")
            grid_shape(size, mask_cell)
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(patch_size,) * 3,
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            use_flash_attention=use_flash_attention,
        )
        self.img_size = size
        self.total_stride = total_stride
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.token_patch = patch_size
        self.mask_cell = mask_cell
        self.stage_channels = tuple(feature_size * 2**i for i in range(NUM_STAGES + 1))
        self._architecture = {
            "in_channels": in_channels, "feature_size": feature_size, "depths": list(depths),
            "num_heads": list(num_heads), "window_size": window_size, "patch_size": patch_size,
            "qkv_bias": qkv_bias, "mlp_ratio": mlp_ratio, "patch_norm": patch_norm, "spatial_dims": 3,
        }
        self.mask_token: nn.Parameter | None = nn.Parameter(torch.zeros(feature_size))
        if mask_token_init_std > 0:
            nn.init.trunc_normal_(self.mask_token, std=mask_token_init_std)

    @classmethod
    def from_config(cls, name: SwinConfigName = "swin_unetr", **overrides: Any) -> "MaskedSwinEncoder":
        """``swin_smit`` or ``swin_unetr`` with overrides; ``None`` values keep the config's default.

        Architecture overrides are the :class:`SwinConfig` fields (feature_size, depths, num_heads,
        window_size, qkv_bias, patch_norm, drop_path_rate, drop_rate, ...); the remaining keywords
        (img_size, in_channels, mask_cell, use_checkpoint, ...) go to the constructor.
        """
        if name not in SWIN_CONFIGS:
            raise ValueError(f"unknown Swin config {name!r}; choose one of {sorted(SWIN_CONFIGS)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        fields = {f.name for f in dataclasses.fields(SwinConfig)}
        arch = dataclasses.replace(SWIN_CONFIGS[name], **{k: v for k, v in overrides.items() if k in fields})
        rest = {k: v for k, v in overrides.items() if k not in fields}
        return cls(**dataclasses.asdict(arch), **rest)

    # ------------------------------------------------------------------ grids and masks
    @property
    def token_grid(self) -> tuple[int, int, int]:
        return grid_shape(self.img_size, self.token_patch)

    @property
    def cell_grid(self) -> tuple[int, int, int]:
        if self.mask_cell is None:
            raise ValueError("this encoder was built without a mask cell size")
        return grid_shape(self.img_size, self.mask_cell)

    def token_mask(self, cell_mask: Tensor) -> Tensor:
        """Cell mask ``B, G_m³`` (True = masked) → token mask ``B, G_p³`` (repeat ``m/p`` per axis)."""
        if self.mask_cell is None:
            raise ValueError("this encoder was built without a mask cell size")
        return upsample_mask(cell_mask, self.mask_cell // self.token_patch)

    def remove_mask_token(self) -> None:
        """Drop the mask token (EMA teacher copies never see masked input and must not carry one)."""
        self.register_parameter("mask_token", None)

    # ------------------------------------------------------------------ forward
    def embed(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """Patch embedding (+ patch norm), mask-token substitution, dropout: ``B, F, G0, G1, G2``."""
        tokens = self.patch_embed(x)
        if token_mask is not None:
            if self.mask_token is None:
                raise RuntimeError("this encoder has no mask token (EMA teacher copies see unmasked input)")
            expected = (tokens.shape[0], *tokens.shape[2:])
            if tuple(token_mask.shape) != expected:
                raise ValueError(f"token mask of shape {tuple(token_mask.shape)} does not match the token grid {expected}")
            token = self.mask_token.to(tokens.dtype).view(1, -1, 1, 1, 1)
            tokens = torch.where(token_mask.unsqueeze(1).bool(), token, tokens)
        return self.pos_drop(tokens)

    def forward(self, x: Tensor, token_mask: Tensor | None = None, normalize: bool = True) -> list[Tensor]:
        """Five feature maps (embedding and the output of each stage after merging).

        ``token_mask`` (``B, G_p³`` bool, True = masked) swaps those embedded tokens for the mask token.
        """
        bad = [s for s in x.shape[2:] if s % self.total_stride]
        if x.ndim != 5 or bad:
            raise ValueError(f"expected B×C×D×H×W with sides divisible by {self.total_stride}, got {tuple(x.shape)}")
        features = [self.embed(x, token_mask)]
        for stage in (self.layers1, self.layers2, self.layers3, self.layers4):
            features.append(stage[0](features[-1].contiguous()))
        return [self.proj_out(f, normalize) for f in features]

    # ------------------------------------------------------------------ export
    def swin_unetr_kwargs(self) -> dict[str, Any]:
        """``monai.networks.nets.SwinUNETR`` constructor arguments that define this encoder."""
        return dict(self._architecture)

    def swin_unetr_state_dict(self, prefix: str = "swinViT.") -> dict[str, Tensor]:
        """Encoder weights in ``SwinUNETR`` key layout (``swinViT.*``), without the mask token."""
        return {f"{prefix}{k}": v.detach().clone() for k, v in self.state_dict().items() if k != "mask_token"}

