"""SparK's light UNet decoder and the "densify" step that feeds it (methods.md §2.4, §4.2).

The sparse encoder leaves hidden positions at zero; before decoding, every consumed scale is
densified — visible-only normalised, hidden positions filled with a learnable per-scale mask token,
projected to the decoder width of that scale — and added to the decoder stream before the block
that runs at that resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_mim.backbones.sparse import NormStatistics, expand_visibility, sparse_norm

DecoderNorm = Literal["batch", "instance"]


def _norm(kind: DecoderNorm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"decoder norm must be 'batch' or 'instance', got {kind!r}")


class UpBlock(nn.Module):
    """ConvTranspose k4 s2 p1 (×2 resolution) → conv3 → norm → ReLU6 → conv3 → norm."""

    def __init__(self, in_channels: int, out_channels: int, norm: DecoderNorm) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU6(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """``log2(up_ratio)`` up-blocks with widths halving from ``width``, then a 1×1 conv to the image channels.

    Args:
        width: input width of the first (coarsest) block; STU-Net-B uses 512 (= its deepest width).
        up_ratio: total upsampling, the encoder's downsample ratio (a power of two).
        out_channels: reconstructed image channels.
        norm: ``"batch"`` (SparK/AnatoMask default) or ``"instance"``.
    """

    def __init__(self, width: int = 512, up_ratio: int = 16, out_channels: int = 1, norm: DecoderNorm = "batch") -> None:
        super().__init__()
        depth = int(round(math.log2(up_ratio))) if up_ratio > 1 else 0
        if up_ratio < 2 or 2**depth != up_ratio:
            raise ValueError(f"up_ratio must be a power of two ≥ 2, got {up_ratio}")
        if width % 2**depth:
            raise ValueError(f"decoder width {width} cannot be halved {depth} times")
        widths = [width // 2**i for i in range(depth + 1)]
        self.block_widths: tuple[int, ...] = tuple(widths[:-1])
        self.blocks = nn.ModuleList(UpBlock(widths[i], widths[i + 1], norm) for i in range(depth))
        self.head = nn.Conv3d(widths[-1], out_channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor | None]) -> Tensor:
        """``features[i]`` (coarsest first, width ``block_widths[i]``) is added before block ``i``; later
        entries may be None or missing, the first one starts the stream."""
        if not features or features[0] is None:
            raise ValueError("the light decoder needs the coarsest feature map to start from")
        x: Tensor | float = 0.0
        for index, block in enumerate(self.blocks):
            if index < len(features) and features[index] is not None:
                x = x + features[index]
            x = block(x)
        return self.head(x)


class Densify(nn.Module):
    """Per consumed scale (coarsest first): sparse InstanceNorm → mask token at hidden positions → projection.

    The projection is the identity at the coarsest scale when encoder and decoder widths agree
    (STU-Net-B: 512/512), a 1×1 conv there otherwise, and a 3×3 conv at every finer scale.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        decoder_widths: Sequence[int],
        instance_statistics: NormStatistics = "batch",
    ) -> None:
        super().__init__()
        if len(encoder_channels) != len(decoder_widths):
            raise ValueError(f"{len(encoder_channels)} encoder scales for {len(decoder_widths)} decoder widths")
        self.instance_statistics = instance_statistics
        self.norms = nn.ModuleList(nn.InstanceNorm3d(c, affine=True) for c in encoder_channels)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in encoder_channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        projections = []
        for index, (c, w) in enumerate(zip(encoder_channels, decoder_widths)):
            if index == 0 and c == w:
                projections.append(nn.Identity())
            else:
                kernel = 1 if index == 0 else 3
                projections.append(nn.Conv3d(c, w, kernel, padding=kernel // 2))
        self.projections = nn.ModuleList(projections)

    def forward(self, features: Sequence[Tensor], visible: Tensor) -> list[Tensor]:
        """``features``: sparse encoder maps, coarsest first; ``visible``: cell grid ``B, G0, G1, G2``."""
        dense = []
        for feature, norm, token, projection in zip(features, self.norms, self.mask_tokens, self.projections):
            here = expand_visibility(visible, feature.shape[2:])
            normed = sparse_norm(norm, feature, here, self.instance_statistics)
            filled = torch.where(here, normed, token.to(normed.dtype))
            dense.append(projection(filled))
        return dense
