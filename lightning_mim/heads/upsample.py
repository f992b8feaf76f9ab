"""Swin UNETR SSL's "vae" reconstruction head (methods-more §6.3): conv → IN → LeakyReLU → ×2 upsampling."""

from __future__ import annotations

import math

from torch import Tensor, nn


class VAEUpsampleHead(nn.Module):
    """``log2(stride)`` blocks {Conv3d k3 → InstanceNorm3d (no affine) → LeakyReLU 0.01 → trilinear ×2},
    halving the channels (``C → C/2 → … → C/16``, then kept), and a final 1×1 conv to ``out_channels``.

    For the 768-channel 3³ bottleneck of a 96³ crop: 768 → 384 → 192 → 96 → 48 → 48 → C (official).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 32) -> None:
        super().__init__()
        steps = int(round(math.log2(stride)))
        if 2**steps != stride:
            raise ValueError(f"the upsampling stride must be a power of two, got {stride}")
        widths = [in_channels] + [max(1, in_channels // 2 ** min(i, steps - 1)) for i in range(1, steps + 1)]
        blocks: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv3d(w_in, w_out, 3, padding=1), nn.InstanceNorm3d(w_out), nn.LeakyReLU(0.01),
                       nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv3d(widths[-1], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(x))
