"""Encoder feature maps of a segmentation network, the same way for every target network.

A pre-training method exports its encoder for a target network (:mod:`.weights`); the maps below
are what that network's decoder receives from the encoder, so a probe on them measures the part
of the network that fine-tuning starts from:

============== ==================================================================================
target         feature maps (``B × C × d × h × w``, finest first)
============== ==================================================================================
unetr          ViT tokens after the skip blocks (3, 6, 9 of 12; see ``networks.skip_blocks``) and the final normed tokens,
               each on the token grid (stride 16)
swin_unetr     the five ``swinViT`` stages (strides 2 … 32), normalised as the network does
stunet_encoder every encoder stage (strides 1 … 16)
hybridmim_unet every encoder level (stem, then each down-sampling)
============== ==================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.segmentation.networks import skip_blocks

#: ViT blocks whose outputs UNETR's decoder takes as skips (1-based, as MONAI indexes them).


def _unetr_features(network: nn.Module, images: Tensor) -> list[Tensor]:
    tokens, hidden = network.vit(images)
    return [network.proj_feat(hidden[i]) for i in skip_blocks(len(hidden))] + [network.proj_feat(tokens)]


def _swin_features(network: nn.Module, images: Tensor) -> list[Tensor]:
    return list(network.swinViT(images, network.normalize))


def _cnn_features(network: nn.Module, images: Tensor) -> list[Tensor]:
    return list(network.encoder(images))


FEATURES: dict[str, Callable[[nn.Module, Tensor], list[Tensor]]] = {
    "unetr": _unetr_features,
    "swin_unetr": _swin_features,
    "stunet_encoder": _cnn_features,
    "hybridmim_unet": _cnn_features,
}


def encoder_features(target: str, network: nn.Module, images: Tensor) -> list[Tensor]:
    """The encoder feature maps of ``network`` (built for ``target``) for ``images`` (see the table above)."""
    try:
        extract = FEATURES[target]
    except KeyError:
        raise ValueError(f"no feature extractor for network {target!r}; known: {sorted(FEATURES)}") from None
    return extract(network, images)


def features_on_grid(features: Sequence[Tensor], grid: Sequence[int]) -> Tensor:
    """Every map resampled to ``grid`` and concatenated along channels.

    Finer maps are average-pooled (each output voxel summarises the voxels it covers), coarser ones
    trilinearly interpolated. A linear layer on the result equals a sum of per-scale linear layers
    each interpolated to ``grid``, so no scale is favoured by construction.
    """
    grid = tuple(int(g) for g in grid)
    out = []
    for feature in features:
        feature = feature.float()
        size = tuple(feature.shape[2:])
        if size == grid:
            out.append(feature)
        elif all(s >= g for s, g in zip(size, grid)):
            out.append(F.adaptive_avg_pool3d(feature, grid))
        else:
            out.append(F.interpolate(feature, size=grid, mode="trilinear", align_corners=False))
    return torch.cat(out, dim=1)
