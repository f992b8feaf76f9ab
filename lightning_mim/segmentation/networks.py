"""Segmentation networks, built from a target name and constructor arguments.

The name is what an exported encoder declares as its ``target`` (see :mod:`.weights`), so a file
alone says which network it belongs to:

============== ======================================================= ===================== =====
target         network                                                 encoder sub-module    ROI ÷
============== ======================================================= ===================== =====
unetr          ``monai.networks.nets.UNETR`` (ViT encoders of 12 blocks;  ``vit``               16
               :class:`ViTUNETR` for any other ``num_layers``)
swin_unetr     ``monai.networks.nets.SwinUNETR`` (Swin encoders; SMIT's ``swinViT``          32
               ``swin_smit`` is the same class with its depths/heads/
               window/qkv_bias)
stunet_encoder STU-Net-style encoder + UNet decoder (AnatoMask)         ``encoder``           16
hybridmim_unet HybridMIM's DeepUNet (:class:`~lightning_mim.backbones    ``encoder``           stride
               .unet.UNet3D`)
============== ======================================================= ===================== =====

Each :class:`NetworkSpec` also knows which parameters belong to the encoder (for strict loading and
freezing) and the depth of every parameter for layer-wise learning-rate decay.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.backbones.unet import UNet3D, unet_layers
from lightning_mim.backbones.vit import as_triple
from lightning_mim.heads.partial_decoder import UNetDecoder


class STUNetUNet(nn.Module):
    """STU-Net-style residual encoder (AnatoMask's pre-trained part) with a UNet decoder.

    The decoder is HybridMIM's :class:`~lightning_mim.heads.partial_decoder.UNetDecoder` (transposed
    convolutions, skip concatenation, two conv blocks per level) with nnU-Net's LeakyReLU 0.01 and
    affine InstanceNorm — not nnU-Net's own STU-Net decoder, which lives outside this project.

    Args:
        in_channels: image channels.
        out_channels: classes (background included).
        dims, depths: encoder stage widths and residual blocks per stage (see ``STUNetEncoder``).
        negative_slope: LeakyReLU slope of the decoder blocks.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, dims: Sequence[int] = (32, 64, 128, 256, 512),
                 depths: int | Sequence[int] = 1, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.encoder = STUNetEncoder(in_channels, dims, depths)
        act, norm = unet_layers(negative_slope)
        self.decoder = UNetDecoder(self.encoder.dims, (2,) * (len(self.encoder.dims) - 1), out_channels, act, norm, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


#: The depth MONAI's UNETR always builds; other ViT depths get :class:`ViTUNETR`.
UNETR_DEPTH = 12


def skip_blocks(depth: int) -> tuple[int, int, int]:
    """Indices of the blocks whose outputs feed UNETR's three skip paths: a quarter, half and three
    quarters of the way up (MONAI's 3, 6, 9 for 12 blocks), clamped to the blocks there are."""
    return tuple(min(depth - 1, round(depth * quarter / 4)) for quarter in (1, 2, 3))


class ViTUNETR(nn.Module):
    """UNETR for a ViT of any depth: MONAI's ViT and UNETR blocks, skips from :func:`skip_blocks`.

    MONAI's ``UNETR`` builds 12 blocks and reads blocks 3, 6 and 9; this network has the same
    sub-modules and parameter names (``vit.*``, ``encoder1..4``, ``decoder2..5``, ``out``), so an
    exported ``unetr`` encoder loads into it exactly as into UNETR, but ``num_layers`` is free.
    The token patch is 16³ as in UNETR (the decoder upsamples four times by 2).

    Args:
        in_channels, out_channels, img_size: input channels, classes, ROI (divisible by 16).
        num_layers, hidden_size, mlp_dim, num_heads, qkv_bias, proj_type, dropout_rate: the ViT.
        feature_size, norm_name, conv_block, res_block: the convolutional decoder (UNETR's defaults).
    """

    def __init__(self, in_channels: int, out_channels: int, img_size: Sequence[int], num_layers: int,
                 hidden_size: int = 768, mlp_dim: int = 3072, num_heads: int = 12, qkv_bias: bool = False,
                 proj_type: str = "conv", dropout_rate: float = 0.0, feature_size: int = 16,
                 norm_name: str | tuple = "instance", conv_block: bool = True, res_block: bool = True) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
        from monai.networks.nets import ViT

        self.feat_size = tuple(int(s) // 16 for s in img_size)
        self.skips = skip_blocks(num_layers)
        self.vit = ViT(in_channels=in_channels, img_size=tuple(img_size), patch_size=16, hidden_size=hidden_size,
                       mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type=proj_type,
                       classification=False, dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias)
        common = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size, stride=1, **common)
        for index, (level, width) in enumerate(((2, 2), (1, 4), (0, 8)), start=2):
            setattr(self, f"encoder{index}", UnetrPrUpBlock(in_channels=hidden_size, out_channels=feature_size * width,
                                                           num_layer=level, stride=1, upsample_kernel_size=2,
                                                           conv_block=conv_block, **common))
        widths = (hidden_size, feature_size * 8, feature_size * 4, feature_size * 2, feature_size)
        for index, (wide, narrow) in zip((5, 4, 3, 2), zip(widths, widths[1:])):
            setattr(self, f"decoder{index}", UnetrUpBlock(in_channels=wide, out_channels=narrow, upsample_kernel_size=2,
                                                          **common))
        self.out = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)

    def proj_feat(self, tokens: Tensor) -> Tensor:
        """``B, N, C`` tokens → ``B, C, d, h, w`` volume (the name and meaning of MONAI UNETR's method)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.feat_size).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        last, hidden = self.vit(x)
        enc2, enc3, enc4 = (getattr(self, f"encoder{i}")(self.proj_feat(hidden[block]))
                            for i, block in zip((2, 3, 4), self.skips))
        up = self.decoder5(self.proj_feat(last), enc4)
        up = self.decoder4(up, enc3)
        up = self.decoder3(up, enc2)
        return self.out(self.decoder2(up, self.encoder1(x)))


def _build_unetr(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **kwargs: Any) -> nn.Module:
    """MONAI's UNETR for 12 ViT blocks (``num_layers``, default 12), :class:`ViTUNETR` for any other depth."""
    from monai.networks.nets import UNETR

    kwargs.pop("img_size", None)  # the pre-training ROI; the network is built for the fine-tuning ROI
    depth = int(kwargs.pop("num_layers", UNETR_DEPTH))
    if depth != UNETR_DEPTH:
        return ViTUNETR(in_channels=in_channels, out_channels=out_channels, img_size=roi_size, num_layers=depth, **kwargs)
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=roi_size, **kwargs)


def _build_swin_unetr(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **kwargs: Any) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    kwargs.pop("img_size", None)  # MONAI >= 1.5 builds Swin UNETR for any size divisible by 32
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, **kwargs)


def _build_stunet(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **kwargs: Any) -> nn.Module:
    return STUNetUNet(in_channels=in_channels, out_channels=out_channels, **kwargs)


def _build_unet(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **kwargs: Any) -> nn.Module:
    return UNet3D(in_channels=in_channels, out_channels=out_channels, **kwargs)


#: Layer index of a final norm: one above the deepest numbered layer, whatever the depth.
AFTER_LAST = 1 << 30


def _numbered_layer(patterns: Sequence[tuple[str, Callable[[re.Match], int]]]) -> Callable[[str], int | None]:
    def index(name: str) -> int | None:
        for pattern, to_index in patterns:
            match = re.match(pattern, name)
            if match:
                return to_index(match)
        return None

    return index


@dataclass(frozen=True)
class NetworkSpec:
    """How to build one segmentation network and where its encoder lives.

    Attributes:
        name: target name (the ``target`` of an exported encoder).
        build: ``build(in_channels, out_channels, roi_size, **kwargs) -> nn.Module``.
        encoder_prefix: state-dict prefix of the pre-trained part; every key under it must be
            present in a pre-trained file (strict loading).
        roi_multiple: the ROI must be divisible by this (None: ask the built network).
        layer_index: encoder depth of a parameter for layer-wise LR decay (0 = stem); None for
            decoder/head parameters, which get the full learning rate.
    """

    name: str
    build: Callable[..., nn.Module]
    encoder_prefix: str
    roi_multiple: int | None
    layer_index: Callable[[str], int | None]


NETWORKS: dict[str, NetworkSpec] = {
    "unetr": NetworkSpec(
        "unetr", _build_unetr, "vit.", 16,
        _numbered_layer([(r"vit\.patch_embedding\.", lambda m: 0), (r"vit\.blocks\.(\d+)\.", lambda m: int(m[1]) + 1),
                         (r"vit\.norm\.", lambda m: AFTER_LAST)]),
    ),
    "swin_unetr": NetworkSpec(
        "swin_unetr", _build_swin_unetr, "swinViT.", 32,
        _numbered_layer([(r"swinViT\.patch_embed\.", lambda m: 0), (r"swinViT\.layers(\d)c?\.", lambda m: int(m[1]))]),
    ),
    "stunet_encoder": NetworkSpec(
        "stunet_encoder", _build_stunet, "encoder.", None,
        _numbered_layer([(r"encoder\.stages\.(\d+)\.", lambda m: int(m[1]))]),
    ),
    "hybridmim_unet": NetworkSpec(
        "hybridmim_unet", _build_unet, "encoder.", None,
        _numbered_layer([(r"encoder\.stem\.", lambda m: 0), (r"encoder\.downs\.(\d+)\.", lambda m: int(m[1]) + 1)]),
    ),
}


def network_spec(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown segmentation network {name!r}; choose one of {sorted(NETWORKS)}") from None


def _network_class(name: str) -> type[nn.Module]:
    from monai.networks.nets import UNETR, SwinUNETR

    return {"unetr": UNETR, "swin_unetr": SwinUNETR, "stunet_encoder": STUNetUNet, "hybridmim_unet": UNet3D}[network_spec(name).name]


def without_defaults(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the arguments equal to the network's constructor defaults.

    Two spellings of one network (an encoder file that writes a default out, another that leaves it
    implicit) then compare equal — the study runs their shared from-scratch arms once.
    """
    defaults = {key: p.default for key, p in inspect.signature(_network_class(name)).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def same(a: Any, b: Any) -> bool:  # a tuple default and the list a YAML/JSON file holds are one value
        return json.dumps(a, default=str) == json.dumps(b, default=str)

    return {key: value for key, value in kwargs.items() if not (key in defaults and same(value, defaults[key]))}


def required_multiple(name: str, network: nn.Module) -> int:
    """The side every input must be divisible by (token patch or total downsampling)."""
    spec = network_spec(name)
    if spec.roi_multiple is not None:
        return spec.roi_multiple
    if hasattr(network, "total_stride"):
        return int(network.total_stride)
    return int(network.encoder.downsample_ratio())


def build_network(name: str, in_channels: int, out_channels: int, roi_size: int | Sequence[int], **kwargs: Any) -> nn.Module:
    """The network ``name`` for ``in_channels`` → ``out_channels`` at ``roi_size``; checks the ROI fits it."""
    spec = network_spec(name)
    roi = as_triple(roi_size)
    try:
        network = spec.build(in_channels, out_channels, roi, **kwargs)
    except TypeError as error:
        raise TypeError(f"cannot build {name!r} with arguments {sorted(kwargs)}: {error}") from error
    multiple = required_multiple(name, network)
    if any(s % multiple for s in roi):
        raise ValueError(f"{name}: the ROI {roi} must be divisible by {multiple} on every axis")
    return network


def layer_ids(name: str, network: nn.Module) -> tuple[dict[str, int], int]:
    """(depth of every parameter, depth of the top) for layer-wise LR decay.

    Encoder parameters get their depth from the spec (stem 0, then one per ViT block or Swin/CNN
    stage); everything else — decoder and head — sits at the top and keeps the full learning rate.
    """
    spec = network_spec(name)
    found = {n: spec.layer_index(n) for n, _ in network.named_parameters()}
    deepest = max((i for i in found.values() if i is not None and i != AFTER_LAST), default=-1)
    found = {n: deepest + 1 if i == AFTER_LAST else i for n, i in found.items()}
    top = max((i for i in found.values() if i is not None), default=-1) + 1
    return {n: top if i is None else i for n, i in found.items()}, top
