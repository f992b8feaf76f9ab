"""U-shaped decoders that can decode only a sub-box of the volume (HybridMIM partial region prediction).

A :class:`SubBox` is given in cells of the bottleneck grid. Every feature map (and the input image)
is cropped to the same physical box before it enters the decoder, so the decoder never reads
anything outside the box: convolutions at the crop border see zero padding, exactly as when the
official code slices its features. ``box=None`` decodes the full volume (fine-tuning).

* :class:`SwinUNETRDecoder` — the convolutional half of MONAI ``SwinUNETR`` with MONAI's own
  sub-module names and shapes (``encoder1..4``, ``encoder10``, ``decoder5..1``, ``out``), so its
  weights plus the Swin encoder's load into ``monai.networks.nets.SwinUNETR`` unchanged.
* :class:`UNetDecoder` — the decoder of HybridMIM's DeepUNet (transposed-conv upsampling,
  skip concatenation, two conv blocks with dropout, 1×1 output conv), used by
  :class:`lightning_mim.backbones.unet.UNet3D`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock, UpSample
from monai.networks.nets.basic_unet import TwoConv
from torch import Tensor, nn


@dataclass(frozen=True)
class SubBox:
    """An axis-aligned box on the bottleneck grid: ``start`` and ``size`` in bottleneck cells per axis."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    def check(self, grid: Sequence[int]) -> None:
        for s, z, g in zip(self.start, self.size, grid):
            if s < 0 or z < 1 or s + z > g:
                raise ValueError(f"box start {self.start} size {self.size} does not fit the bottleneck grid {tuple(grid)}")

    def voxel_slices(self, factor: Sequence[int]) -> tuple[slice, slice, slice]:
        """The box on a grid ``factor`` times finer than the bottleneck along each axis."""
        return tuple(slice(s * f, (s + z) * f) for s, z, f in zip(self.start, self.size, factor))


def default_box_size(grid: Sequence[int], fraction: float = 2 / 3) -> tuple[int, int, int]:
    """``round(fraction · G)`` bottleneck cells per axis (2 of 3 at 96³ for Swin, 8 of 12 for the UNet).

    At least 2 cells where the axis has them: the decoder's InstanceNorm needs more than one value
    per channel while training, so a 1³ box at the bottleneck would fail.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"box fraction must be in (0, 1], got {fraction}")
    return tuple(max(min(2, int(g)), round(fraction * int(g))) for g in grid)


def fixed_box(grid: Sequence[int], size: Sequence[int]) -> SubBox:
    """The box touching the far corner of every axis — the official ``[1:3)`` of 3 / ``[4:12)`` of 12."""
    box = SubBox(tuple(int(g) - int(z) for g, z in zip(grid, size)), tuple(int(z) for z in size))
    box.check(grid)
    return box


def random_box(grid: Sequence[int], size: Sequence[int], generator: torch.Generator | None = None) -> SubBox:
    """A box of ``size`` at a uniformly random position on the bottleneck grid."""
    start = tuple(int(torch.randint(0, int(g) - int(z) + 1, (1,), generator=generator)) for g, z in zip(grid, size))
    box = SubBox(start, tuple(int(z) for z in size))
    box.check(grid)
    return box


def crop_to_box(feature: Tensor, box: SubBox | None, grid: Sequence[int]) -> Tensor:
    """Crop a ``B, C, D, H, W`` map to ``box`` (given on the bottleneck ``grid``); identity for ``None``."""
    if box is None:
        return feature
    spatial = feature.shape[2:]
    if any(s % int(g) for s, g in zip(spatial, grid)):
        raise ValueError(f"feature map of size {tuple(spatial)} is not a multiple of the bottleneck grid {tuple(grid)}")
    box.check(grid)
    factor = [s // int(g) for s, g in zip(spatial, grid)]
    return feature[(..., *box.voxel_slices(factor))]


class SwinUNETRDecoder(nn.Module):
    """MONAI ``SwinUNETR``'s residual UNETR decoder, box-aware, with MONAI's module names.

    Args:
        in_channels: image channels (``encoder1`` convolves the image itself).
        out_channels: output channels of the 1×1 ``out`` block.
        feature_size: Swin embedding width ``F``; stage outputs have ``F, 2F, 4F, 8F, 16F`` channels.
        norm_name: MONAI norm of the decoder blocks (``instance`` as in SwinUNETR).
    """

    def __init__(self, in_channels: int, out_channels: int, feature_size: int, norm_name: str | tuple = "instance") -> None:
        super().__init__()
        f = feature_size

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True)

        self.encoder1 = basic(in_channels, f)
        self.encoder2 = basic(f, f)
        self.encoder3 = basic(2 * f, 2 * f)
        self.encoder4 = basic(4 * f, 4 * f)
        self.encoder10 = basic(16 * f, 16 * f)
        self.decoder5 = up(16 * f, 8 * f)
        self.decoder4 = up(8 * f, 4 * f)
        self.decoder3 = up(4 * f, 2 * f)
        self.decoder2 = up(2 * f, f)
        self.decoder1 = up(f, f)
        self.out = UnetOutBlock(3, f, out_channels)

    def forward(self, image: Tensor, stages: Sequence[Tensor], box: SubBox | None = None) -> Tensor:
        """Logits over ``box`` (or the whole volume) from the image and the 5 Swin stage outputs."""
        if len(stages) != 5:
            raise ValueError(f"expected the 5 Swin stage outputs, got {len(stages)}")
        grid = stages[4].shape[2:]
        s0, s1, s2, s3, s4 = (crop_to_box(s, box, grid) for s in stages)
        enc0 = self.encoder1(crop_to_box(image, box, grid))
        enc1 = self.encoder2(s0)
        enc2 = self.encoder3(s1)
        enc3 = self.encoder4(s2)
        x = self.decoder5(self.encoder10(s4), s3)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        x = self.decoder2(x, enc1)
        return self.out(self.decoder1(x, enc0))


class UNetUpBlock(nn.Module):
    """Transposed-conv upsampling to half the channels, concatenation with the skip, two conv blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, stride: int,
                 act: str | tuple, norm: str | tuple, dropout: float) -> None:
        super().__init__()
        half = in_channels // 2
        self.upsample = UpSample(3, in_channels, half, scale_factor=stride, mode="deconv")
        self.convs = TwoConv(3, skip_channels + half, out_channels, act, norm, bias=True, dropout=dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([skip, self.upsample(x)], dim=1))


class UNetDecoder(nn.Module):
    """HybridMIM DeepUNet decoder over encoder features ``[level 0 (full res), …, bottleneck]``.

    Args:
        channels: encoder channels per level, e.g. ``(64, 64, 128, 256, 512)``.
        strides: downsampling factor between consecutive levels, e.g. ``(2, 2, 2, 1)``.
        out_channels: output channels of the 1×1 ``out`` block.
        act, norm, dropout: of every decoder conv block (DeepUNet: LeakyReLU 0.1, affine
            InstanceNorm, dropout 0.1).
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], out_channels: int,
                 act: str | tuple, norm: str | tuple, dropout: float) -> None:
        super().__init__()
        channels = list(channels)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"{len(channels)} levels need {len(channels) - 1} strides, got {list(strides)}")
        self.ups = nn.ModuleList(
            UNetUpBlock(channels[d + 1], channels[d], channels[d], strides[d], act, norm, dropout)
            for d in reversed(range(len(strides)))
        )
        self.out = UnetOutBlock(3, channels[0], out_channels)

    def forward(self, features: Sequence[Tensor], box: SubBox | None = None) -> Tensor:
        """Logits over ``box`` (or the whole volume); features are cropped to the box at every level."""
        if len(features) != len(self.ups) + 1:
            raise ValueError(f"expected {len(self.ups) + 1} feature maps, got {len(features)}")
        grid = features[-1].shape[2:]
        x = crop_to_box(features[-1], box, grid)
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, crop_to_box(skip, box, grid))
        return self.out(x)
