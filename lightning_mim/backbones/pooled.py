"""Encoders that give one global vector per image (contrastive methods): UNet, Swin or ViT, plus export.

The vector is the concatenated global average pool of every stage's feature map (nnssl's SimCLR and
VoCo read all stages) — for the ViT, the mean of its patch tokens. ``export`` returns the encoder in
its segmentation network's key layout: UNet → :class:`~lightning_mim.backbones.unet.UNet3D`
(``hybridmim_unet`` target, encoder keys only), Swin → MONAI ``SwinUNETR.swinViT``, ViT → MONAI
``UNETR.vit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_mim.backbones.compositions import NetworkExport
from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.backbones.unet import UNetEncoder
from lightning_mim.backbones.vit import ViT3D, unetr_encoder_export
from lightning_mim.heads.projector import pooled_pyramid

Backbone = Literal["unet", "swin", "vit"]


class PooledEncoder(nn.Module):
    """One of three encoders behind a common ``forward(x) → B, feature_dim`` interface.

    Args:
        backbone: ``unet`` (our UNet encoder, methods.md §2.3), ``swin`` (MONAI Swin UNETR config) or ``vit``.
        img_size: input side(s).
        in_channels: image channels.
        unet_channels, unet_strides: UNet levels.
        swin_feature_size, swin_depths: Swin width and blocks per stage (heads 3, 6, 12, 24; window 7).
        vit_embed_dim, vit_depth, vit_heads, vit_patch_size: ViT-3D (UNETR export needs 12 blocks, 16³ patches).
    """

    def __init__(
        self,
        backbone: Backbone = "unet",
        img_size: int | Sequence[int] = 64,
        in_channels: int = 1,
        unet_channels: Sequence[int] = (32, 64, 128, 256, 320),
        unet_strides: Sequence[int] = (2, 2, 2, 2),
        swin_feature_size: int = 48,
        swin_depths: Sequence[int] = (2, 2, 2, 2),
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_heads: int = 12,
        vit_patch_size: int = 16,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.in_channels = in_channels
        if backbone == "unet":
            self.net: nn.Module = UNetEncoder(in_channels, unet_channels, unet_strides, dropout=0.0, negative_slope=0.1)
            self.feature_dim = sum(int(c) for c in unet_channels)
            self.unet_config = {"channels": [int(c) for c in unet_channels], "strides": [int(s) for s in unet_strides]}
        elif backbone == "swin":
            self.net = MaskedSwinEncoder.from_config("swin_unetr", img_size=img_size, in_channels=in_channels,
                                                     feature_size=swin_feature_size, depths=swin_depths)
            self.net.remove_mask_token()
            self.feature_dim = sum(self.net.stage_channels)
        elif backbone == "vit":
            self.net = ViT3D(img_size, vit_patch_size, in_channels, vit_embed_dim, vit_depth, vit_heads, use_cls_token=False)
            self.feature_dim = vit_embed_dim
        else:
            raise ValueError(f"backbone must be 'unet', 'swin' or 'vit', got {backbone!r}")

    def forward(self, x: Tensor) -> Tensor:
        if self.backbone == "vit":
            return self.net(x).float().mean(dim=1)
        if self.backbone == "unet":
            self.check_divisible(x)
        return pooled_pyramid(self.net(x))

    def check_divisible(self, x: Tensor) -> None:
        stride = self.net.total_stride
        if any(s % stride for s in x.shape[2:]):
            raise ValueError(f"input sides {tuple(x.shape[2:])} must be divisible by the UNet's total stride {stride}")

    def export(self) -> NetworkExport:
        """The weights in the key layout of the segmentation network this encoder loads into."""
        if self.backbone == "unet":
            state = {f"encoder.{k}": v.detach().clone() for k, v in self.net.state_dict().items()}
            return NetworkExport("hybridmim_unet", state,
                                 {"in_channels": self.in_channels, **self.unet_config, "dropout": 0.0})
        if self.backbone == "swin":
            return NetworkExport("swin_unetr", self.net.swin_unetr_state_dict(), self.net.swin_unetr_kwargs())
        return NetworkExport("unetr", *unetr_encoder_export(self.net))
