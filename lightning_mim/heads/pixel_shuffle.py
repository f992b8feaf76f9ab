"""SimMIM / SMIT "masked image prediction" head: a 1×1×1 conv followed by a 3D pixel shuffle.

Channel layout of the 3D pixel shuffle with factor ``r`` (the 3D extension of
``torch.nn.functional.pixel_shuffle``): input channel ``c·r³ + (i·r + j)·r + k`` at cell
``(d, h, w)`` becomes output channel ``c`` at voxel ``(d·r + i, h·r + j, w·r + k)``. For one channel
this is exactly the ``(p0, p1, p2)`` order of :func:`lightning_mim.masking.grid.patchify`.
"""

from __future__ import annotations

from torch import Tensor, nn


def pixel_shuffle_3d(x: Tensor, factor: int) -> Tensor:
    """``B, C·r³, D, H, W`` → ``B, C, D·r, H·r, W·r`` (layout in the module docstring)."""
    b, channels, d, h, w = x.shape
    if channels % factor**3:
        raise ValueError(f"{channels} channels cannot be shuffled by a factor {factor} (needs a multiple of {factor**3})")
    c = channels // factor**3
    x = x.reshape(b, c, factor, factor, factor, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * factor, h * factor, w * factor)


def pixel_unshuffle_3d(x: Tensor, factor: int) -> Tensor:
    """Inverse of :func:`pixel_shuffle_3d`: ``B, C, D·r, H·r, W·r`` → ``B, C·r³, D, H, W``."""
    b, c, dr, hr, wr = x.shape
    if dr % factor or hr % factor or wr % factor:
        raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by {factor}")
    d, h, w = dr // factor, hr // factor, wr // factor
    x = x.reshape(b, c, d, factor, h, factor, w, factor)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor**3, d, h, w)


class LinearPixelShuffleDecoder(nn.Module):
    """1×1×1 conv to ``stride³·out_channels`` channels, then a 3D pixel shuffle by ``stride``.

    A single linear map per bottleneck cell (no activation), as in SimMIM and SMIT: from a stride-32
    Swin bottleneck (768 → 32³ = 32,768 channels at F = 48) it predicts every voxel of the input.
    """

    def __init__(self, in_channels: int, stride: int, out_channels: int = 1) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.stride = stride
        self.proj = nn.Conv3d(in_channels, stride**3 * out_channels, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        return pixel_shuffle_3d(self.proj(features), self.stride)
