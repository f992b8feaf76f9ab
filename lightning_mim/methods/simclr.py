"""SimCLR-3D (Chen et al. 2020; 3-D recipe of nnssl, methods-more §4.2): two views, NT-Xent, any encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mim.backbones.pooled import Backbone, PooledEncoder
from lightning_mim.heads.projector import MLPProjector, ProjectorNorm
from lightning_mim.losses.contrastive import nt_xent
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput


def two_views(batch: dict[str, Any], method: str) -> tuple[Tensor, Tensor]:
    """The ``B×2×C×D×H×W`` views of a batch as two ``B×C×D×H×W`` tensors, or a one-line error."""
    views = batch.get("views")
    if views is None or views.ndim != 6 or views.shape[1] != 2:
        raise ValueError(f"{method} needs two views per volume in batch['views'] (B×2×C×D×H×W); configure the data "
                         "module with num_views: 2 and a view_size smaller than patch_size")
    return views[:, 0], views[:, 1]


class SimCLR3D(MIMModule):
    """Two augmented views of each volume → encoder → pooled multi-stage feature → MLP projector → NT-Xent.

    The views come from the data module (``num_views: 2``): two random ``view_size`` crops of one
    context patch, each with its own flips and intensity jitter. A context patch of 1.5 × the view
    side bounds each axis's offset by half a view, so every pair overlaps by ≥ 50 % per axis — the
    constraint nnssl's ``SimCLRTransform`` imposes on its partner crops.

    Choices where the spec is open (each a flag): negatives are gathered from every rank
    (``gather_negatives``; nnssl keeps them per rank); the projector normalises per sample as nnssl
    (``projector_norm: sample``; ``batch`` is VoCo's BatchNorm).

    Args:
        backbone, img_size, in_channels, unet_channels, unet_strides, swin_feature_size, swin_depths,
            vit_embed_dim, vit_depth, vit_heads, vit_patch_size: the encoder (:class:`PooledEncoder`).
        projector_hidden_dim, projector_dim, projector_layers, projector_norm: the MLP projector (nnssl 2048³).
        temperature: NT-Xent τ (0.5).
        gather_negatives: negatives from every rank under DDP.
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        backbone: Backbone = "unet",
        img_size: int | tuple[int, int, int] = 64,
        in_channels: int = 1,
        unet_channels: Sequence[int] = (32, 64, 128, 256, 320),
        unet_strides: Sequence[int] = (2, 2, 2, 2),
        swin_feature_size: int = 48,
        swin_depths: Sequence[int] = (2, 2, 2, 2),
        vit_embed_dim: int = 768,
        vit_depth: int = 12,
        vit_heads: int = 12,
        vit_patch_size: int = 16,
        projector_hidden_dim: int = 2048,
        projector_dim: int = 2048,
        projector_layers: int = 3,
        projector_norm: ProjectorNorm = "sample",
        temperature: float = 0.5,
        gather_negatives: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.encoder = PooledEncoder(backbone, img_size, in_channels, unet_channels, unet_strides, swin_feature_size,
                                     swin_depths, vit_embed_dim, vit_depth, vit_heads, vit_patch_size)
        self.projector = MLPProjector(self.encoder.feature_dim, projector_hidden_dim, projector_dim, projector_layers,
                                      projector_norm)
        self.img_size = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.img_size

    def embed(self, images: Tensor) -> Tensor:
        return self.projector(self.encoder(images))

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        first, second = two_views(batch, "SimCLR-3D")
        b = first.shape[0]
        z = self.embed(torch.cat([first, second]))  # one pass: norm statistics over both views
        loss = nt_xent(z[:b], z[b:], self.hparams.temperature, self.hparams.gather_negatives)
        with torch.no_grad():
            cosine = torch.nn.functional.cosine_similarity(z[:b].float(), z[b:].float()).mean()
        visuals = {"view1": first, "view2": second} if self.capture_visuals else {}
        return StepOutput(losses={"loss": loss, "nt_xent": loss.detach()}, visuals=visuals,
                          scalars={"positive_cosine": cosine})

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(*self.encoder.export(), {"method": "simclr3d", "backbone": self.encoder.backbone,
                                                        "img_size": list(self.img_size)})
