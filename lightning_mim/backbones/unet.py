"""HybridMIM's 3D UNet ("DeepUNet v2", methods.md §6.2), built from MONAI blocks.

Levels: a two-conv stem at full resolution, then per level max-pooling by its stride followed by
two conv blocks (MONAI ``TwoConv``: conv3 → InstanceNorm(affine) → dropout → LeakyReLU 0.1, twice;
dropout before the activation equals dropout after it because LeakyReLU is positively homogeneous).
The published network uses channels (64, 64, 128, 256, 512) and strides (2, 2, 2, 1), so the
bottleneck is 12³ × 512 at 96³. As in the official code, dropout is applied in the stem and in the
decoder only, never in the pooled encoder levels — the stem's dropout is what makes HybridMIM's
two encoder passes differ.

:class:`UNet3D` is also the fine-tuning network: ``forward(x)`` decodes the full volume to
``out_channels`` logits; pre-training decodes a :class:`~lightning_mim.heads.partial_decoder.SubBox`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from monai.networks.nets.basic_unet import TwoConv
from torch import Tensor, nn

from lightning_mim.backbones.compositions import NetworkExport
from lightning_mim.heads.partial_decoder import SubBox, UNetDecoder


def unet_layers(negative_slope: float) -> tuple[tuple, tuple]:
    """MONAI ``act`` and ``norm`` specifications of DeepUNet's conv blocks."""
    return ("LeakyReLU", {"negative_slope": negative_slope, "inplace": True}), ("instance", {"affine": True})


class UNetEncoder(nn.Module):
    """Contracting path; returns the feature map of every level, the bottleneck last.

    Args:
        in_channels: image channels.
        channels: channels per level (stem first, bottleneck last).
        strides: max-pooling factor in front of each level after the stem (1 = no pooling).
        dropout: dropout of the stem's conv blocks.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], strides: Sequence[int], dropout: float,
                 negative_slope: float) -> None:
        super().__init__()
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError(f"{len(channels)} levels need {len(channels) - 1} strides, got {strides}")
        if any(s < 1 for s in strides) or any(c < 2 for c in channels):
            raise ValueError(f"strides must be ≥ 1 and channels ≥ 2, got strides {strides}, channels {channels}")
        act, norm = unet_layers(negative_slope)
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.stem = TwoConv(3, in_channels, channels[0], act, norm, bias=True, dropout=dropout)
        self.downs = nn.ModuleList(
            nn.Sequential(OrderedDict(
                pool=nn.MaxPool3d(stride),
                convs=TwoConv(3, channels[i], channels[i + 1], act, norm, bias=True, dropout=0.0),
            ))
            for i, stride in enumerate(strides)
        )

    @property
    def total_stride(self) -> int:
        """Voxels per bottleneck cell along each axis."""
        return math.prod(self.strides)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class UNet3D(nn.Module):
    """Encoder + decoder; full-volume segmentation network and HybridMIM's pre-training network.

    A :class:`~lightning_mim.backbones.compositions.MaskedNetwork` that takes no mask (HybridMIM fills
    the hidden voxels instead); ``export`` gives every weight but the output layer's.

    Args:
        in_channels: image channels.
        out_channels: output channels (1 for reconstruction, the class count for segmentation).
        channels: channels per level (DeepUNet v2: 64, 64, 128, 256, 512).
        strides: pooling per level after the stem (DeepUNet v2: 2, 2, 2, 1).
        dropout: dropout of the stem and decoder conv blocks (0.1).
        negative_slope: LeakyReLU slope (0.1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (64, 64, 128, 256, 512),
        strides: Sequence[int] = (2, 2, 2, 1),
        dropout: float = 0.1,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = UNetEncoder(in_channels, channels, strides, dropout, negative_slope)
        act, norm = unet_layers(negative_slope)
        self.decoder = UNetDecoder(channels, strides, out_channels, act, norm, dropout)
        self.in_channels, self.dropout = in_channels, dropout

    @property
    def total_stride(self) -> int:
        return self.encoder.total_stride

    @property
    def bottleneck_channels(self) -> int:
        return int(self.encoder.channels[-1])

    def check_input_size(self, size: Sequence[int]) -> None:
        bad = [int(s) for s in size if int(s) % self.total_stride]
        if bad:
            raise ValueError(f"input size {tuple(size)} must be divisible by the UNet's total stride {self.total_stride}")

    def encode(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        if mask is not None:
            raise ValueError("UNet3D takes no mask: fill the hidden voxels of its input instead")
        return self.encoder(images)

    def decode(self, images: Tensor, features: list[Tensor], mask: Tensor | None = None,
               box: SubBox | None = None) -> Tensor:
        return self.decoder(features, box)

    def forward(self, x: Tensor, box: SubBox | None = None) -> Tensor:
        self.check_input_size(x.shape[2:])
        return self.decoder(self.encoder(x), box)

    def export(self) -> NetworkExport:
        """Encoder and decoder weights without ``decoder.out`` (the class count differs), for ``hybridmim_unet``."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("decoder.out.")}
        kwargs = {"in_channels": self.in_channels, "channels": [int(c) for c in self.encoder.channels],
                  "strides": [int(s) for s in self.encoder.strides], "dropout": self.dropout}
        return NetworkExport("hybridmim_unet", state, kwargs)
