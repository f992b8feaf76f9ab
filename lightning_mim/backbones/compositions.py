"""Network compositions the masked-modeling methods train, behind one interface: encode, decode, export.

A composition joins a backbone to what the method puts after it (a decoder, heads) and knows which
segmentation network its weights load into. Methods build one and call it through
:class:`MaskedNetwork` only, so a method that offers several backbones (HybridMIM: Swin UNETR or the
DeepUNet) has one code path for all of them.

* :class:`SparKNetwork` — sparse CNN encoder → densify → light decoder (AnatoMask, SparK).
* :class:`SMITNetwork` — masked Swin encoder → LayerNorm'ed tap → DINO heads (SMIT's student/teacher).
* :class:`SwinUNETRNetwork` — masked Swin encoder → Swin UNETR's residual decoder (HybridMIM, Swin).
* :class:`~lightning_mim.backbones.unet.UNet3D` — the DeepUNet (HybridMIM, UNet; Models Genesis, Volume Fusion).

Two more are built for one method each and are not masked networks: :class:`DINOv2Network` (ViT →
DINO and iBOT heads) and :class:`VoCoBackbone` (Swin encoder → Swin UNETR's encoder blocks → one pooled
vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock
from torch import Tensor, nn

from lightning_mim.backbones.masked_vit import MaskedViT3D
from lightning_mim.backbones.sparse import NormStatistics, SparseEncoder
from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.backbones.vit import unetr_encoder_export
from lightning_mim.heads.dino import DINOHead
from lightning_mim.heads.light_decoder import DecoderNorm, Densify, LightDecoder
from lightning_mim.heads.partial_decoder import SubBox, SwinUNETRDecoder
from lightning_mim.heads.projector import pooled_pyramid

#: ``SwinUNETR`` arguments under which exported conv blocks were trained: instance norm, fed normalised
#: Swin maps (Swin UNETR's decoder in HybridMIM, VoCo's encoder blocks).
SWIN_UNETR_BLOCK_KWARGS = {"norm_name": "instance", "normalize": True}


class NetworkExport(NamedTuple):
    """Pre-trained weights in the key layout of segmentation network ``target``, and its constructor kwargs."""

    target: str
    state_dict: dict[str, Tensor]
    network_kwargs: dict[str, Any]


@runtime_checkable
class MaskedNetwork(Protocol):
    """What a method needs from the network it pre-trains.

    ``encode`` gives the feature maps (finest first, bottleneck last) of ``images`` seen through
    ``mask`` (True = hidden; the composition says on which grid, or that it takes none);
    ``decode`` turns them into the method's output (a volume, or head logits), over the bottleneck
    sub-box ``box`` when given; ``export`` gives the weights that initialise fine-tuning.
    """

    def encode(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]: ...

    def decode(self, images: Tensor, features: list[Tensor], mask: Tensor | None = None,
               box: SubBox | None = None) -> Any: ...

    def export(self) -> NetworkExport: ...


def _no_box(name: str, box: SubBox | None) -> None:
    if box is not None:
        raise ValueError(f"{name} decodes the whole volume; it takes no sub-box")


class SparKNetwork(nn.Module):
    """Sparse CNN encoder → densify → light UNet decoder: a full volume from the visible cells.

    The mask is ``B, G0, G1, G2`` on the encoder's coarsest grid. The decoder consumes the
    ``log2(ratio)`` coarsest encoder scales; the full-resolution map is not densified (SparK computes
    it and never uses it). Exports the dense encoder (``stunet_encoder``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder_width: int,
        out_channels: int,
        decoder_norm: DecoderNorm = "batch",
        instance_statistics: NormStatistics = "batch",
    ) -> None:
        super().__init__()
        self.encoder = SparseEncoder(encoder, instance_statistics)
        self.decoder = LightDecoder(decoder_width, self.encoder.downsample_ratio(), out_channels, decoder_norm)
        self.num_scales = len(self.decoder.block_widths)
        channels = tuple(reversed(self.encoder.feature_channels()))
        if len(channels) < self.num_scales:
            raise ValueError(f"the encoder has {len(channels)} scales, the decoder needs {self.num_scales}")
        self.densify = Densify(channels[: self.num_scales], self.decoder.block_widths, instance_statistics)

    def encode(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        if mask is None:
            raise ValueError("SparKNetwork encodes the visible cells of a mask; pass the cell mask")
        return self.encoder(images, mask)

    def decode(self, images: Tensor, features: list[Tensor], mask: Tensor | None = None,
               box: SubBox | None = None) -> Tensor:
        if mask is None:
            raise ValueError("SparKNetwork densifies the hidden cells of the mask it encoded with; pass that mask")
        _no_box("SparKNetwork", box)
        coarsest_first = features[::-1][: self.num_scales]
        return self.decoder(self.densify(coarsest_first, ~mask))

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """Reconstruction ``B, C, D, H, W`` of ``images`` seen through the cell ``mask`` (True = hidden)."""
        return self.decode(images, self.encode(images, mask), mask)

    def export(self) -> NetworkExport:
        """The dense encoder's weights (this project's :class:`STUNetEncoder` keys) and its constructor args."""
        dense = self.encoder.encoder
        state_dict = {key: value.detach().clone() for key, value in dense.state_dict().items()}
        return NetworkExport("stunet_encoder", state_dict, dense.network_kwargs())


#: Index of SMIT's distillation tap among the encoder's five feature maps (output of the 3rd merging).
TAP_STAGE = 3


@dataclass
class SMITOutput:
    bottleneck: Tensor  # B, 16F, S/32, S/32, S/32 (raw, before any stage normalisation)
    cls_logits: Tensor  # B, K
    patch_logits: Tensor  # B, L, K  (L tap tokens in row-major order, one per mask cell)


class SMITNetwork(nn.Module):
    """Encoder + LayerNorm on the 6³ tap + DINO heads: SMIT's student, and (deep-copied) its teacher.

    The mask is a token mask (``B, G_p³``, see :meth:`MaskedSwinEncoder.token_mask`). The global token
    is the mean of the LayerNorm'ed tap tokens (Swin has no [CLS] token). With ``shared_head`` one head
    serves both the global and the patch tokens (iBOT ``shared_head``). Exports the Swin encoder
    (``swin_unetr``).
    """

    def __init__(self, encoder: MaskedSwinEncoder, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 nlayers: int, norm_last_layer: bool, shared_head: bool) -> None:
        super().__init__()
        self.encoder = encoder
        width = encoder.stage_channels[TAP_STAGE]
        self.tap_norm = nn.LayerNorm(width, eps=1e-6)
        self.cls_head = DINOHead(width, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
        self.patch_head = None if shared_head else DINOHead(width, out_dim, hidden_dim, bottleneck_dim, nlayers,
                                                            norm_last_layer)

    def heads(self) -> list[DINOHead]:
        return [self.cls_head] if self.patch_head is None else [self.cls_head, self.patch_head]

    def encode(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        return self.encoder(images, mask, normalize=False)

    def decode(self, images: Tensor, features: list[Tensor], mask: Tensor | None = None,
               box: SubBox | None = None) -> SMITOutput:
        _no_box("SMITNetwork", box)
        tap = self.tap_norm(features[TAP_STAGE].flatten(2).transpose(1, 2))
        patch_head = self.cls_head if self.patch_head is None else self.patch_head
        return SMITOutput(features[-1], self.cls_head(tap.mean(dim=1)), patch_head(tap))

    def forward(self, images: Tensor, token_mask: Tensor | None = None) -> SMITOutput:
        return self.decode(images, self.encode(images, token_mask))

    def export(self) -> NetworkExport:
        return NetworkExport("swin_unetr", self.encoder.swin_unetr_state_dict(), self.encoder.swin_unetr_kwargs())


class SwinUNETRNetwork(nn.Module):
    """MONAI Swin UNETR as a masked network: Swin encoder (normalised stages) + its residual conv decoder.

    The mask is a token mask (``B, G_p³``; needs the encoder's mask token). Exports encoder **and**
    decoder, without the output layer (the class count differs), for
    ``SwinUNETR(out_channels=K, **network_kwargs)``.
    """

    def __init__(self, encoder: MaskedSwinEncoder, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = SwinUNETRDecoder(in_channels, out_channels, encoder.feature_size)

    @property
    def bottleneck_channels(self) -> int:
        return self.encoder.stage_channels[-1]

    @property
    def total_stride(self) -> int:
        return self.encoder.total_stride

    def encode(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        return self.encoder(images, mask, normalize=True)

    def decode(self, images: Tensor, features: list[Tensor], mask: Tensor | None = None,
               box: SubBox | None = None) -> Tensor:
        return self.decoder(images, features, box)

    def forward(self, images: Tensor, box: SubBox | None = None) -> Tensor:
        return self.decode(images, self.encode(images), box=box)

    def export(self) -> NetworkExport:
        decoder = {k: v.detach().clone() for k, v in self.decoder.state_dict().items() if not k.startswith("out.")}
        kwargs = {**self.encoder.swin_unetr_kwargs(), **SWIN_UNETR_BLOCK_KWARGS}
        return NetworkExport("swin_unetr", {**self.encoder.swin_unetr_state_dict(), **decoder}, kwargs)


class DINOv2Network(nn.Module):
    """ViT backbone + separate DINO ([CLS]) and iBOT (patch) heads: the student and, deep-copied, the teacher."""

    def __init__(self, backbone: MaskedViT3D, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.ibot_head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim)

    def forward(self, images: Tensor, token_mask: Tensor | None = None, patches: bool = True):
        """(backbone [CLS], DINO logits, iBOT logits of every patch token or None)."""
        tokens = self.backbone(images, token_mask)
        cls = tokens[:, 0]
        return cls, self.dino_head(cls), self.ibot_head(tokens[:, 1:]) if patches else None

    def export(self) -> NetworkExport:
        """The ViT for MONAI ``UNETR`` (``vit.*``); raises when UNETR cannot hold it (12 blocks, 16³ patches)."""
        return NetworkExport("unetr", *unetr_encoder_export(self.backbone))


#: MONAI ``SwinUNETR`` block name → (Swin feature map index or ``None`` for the raw input, width multiple of F).
PYRAMID = {"encoder1": (None, 1), "encoder2": (0, 1), "encoder3": (1, 2), "encoder4": (2, 4), "encoder10": (4, 16)}


class VoCoBackbone(nn.Module):
    """Swin encoder + the residual ``UnetrBasicBlock``s of MONAI ``SwinUNETR`` (same names) whose
    global-average pools, concatenated, give the ``24F`` feature (VoCo ``voco_head.Swin``)."""

    def __init__(self, swin: MaskedSwinEncoder, in_channels: int) -> None:
        super().__init__()
        self.swinViT = swin
        f = swin.feature_size
        for name, (index, multiple) in PYRAMID.items():
            width_in = in_channels if index is None else f * multiple
            self.add_module(name, UnetrBasicBlock(3, width_in, f * multiple, kernel_size=3, stride=1,
                                                  norm_name="instance", res_block=True))
        self.feature_dim = 24 * f

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.swinViT(x)  # normalised maps, as SwinUNETR feeds its decoder
        maps = [residual_block(getattr(self, name), x if index is None else hidden[index])
                for name, (index, _) in PYRAMID.items()]
        return pooled_pyramid(maps)

    def export(self) -> NetworkExport:
        """``swinViT.*`` plus the pre-trained ``encoder1..4``/``encoder10`` blocks, under MONAI ``SwinUNETR`` names."""
        state = self.swinViT.swin_unetr_state_dict()
        for name in PYRAMID:
            state.update({f"{name}.{k}": v.detach().clone() for k, v in getattr(self, name).state_dict().items()})
        kwargs = {**self.swinViT.swin_unetr_kwargs(), **SWIN_UNETR_BLOCK_KWARGS}
        return NetworkExport("swin_unetr", state, kwargs)


def residual_block(block: UnetrBasicBlock, x: Tensor) -> Tensor:
    """``block(x)``, also on a one-voxel map (the stride-32 bottleneck of a 32³ crop), where torch refuses instance
    norm: the norm of one value is exactly 0, so the residual block reduces to LeakyReLU of its shortcut (the
    input, or 0 where the shortcut is itself a normalised conv) and its weights get no gradient."""
    if x.shape[2:].numel() > 1:
        return block(x)
    layer = block.layer
    if layer.downsample:
        return x.new_zeros(x.shape[0], layer.conv1.conv.out_channels, *x.shape[2:])
    return F.leaky_relu(x, layer.lrelu.negative_slope)
