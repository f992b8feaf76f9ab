"""Swin UNETR self-supervised pre-training (Tang et al., CVPR 2022; methods-more §6): rotation, contrast, inpainting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.corruption.swin_ssl import ROTATION_DIMS, RotationPlane, cutout, random_rotation
from lightning_mim.heads.upsample import VAEUpsampleHead
from lightning_mim.losses.contrastive import nt_xent
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput

ReconstructionWeighting = Literal["all", "corrupted"]


class SwinUNETRSSL(MIMModule):
    """Three proxy tasks on one Swin encoder; only ``swinViT`` transfers (MONAI ``SwinUNETR`` layout).

    Per step, each crop of the batch is rotated twice independently (labels k ∈ {0..3}) and each
    rotated copy is corrupted by :func:`~lightning_mim.corruption.swin_ssl.cutout`. The encoder's
    normalised bottleneck feeds (i) a 4-way rotation head, (ii) a 512-d contrastive head — NT-Xent
    between the two copies of the same crop, τ 0.5 — and (iii) the "vae" upsampling head that
    reconstructs the rotated, uncorrupted crop (L1). The two copies go through one concatenated pass
    (the encoder has no batch statistics, so this equals the official two passes).

    Choices where the spec is open (flags; spec §6.10): heads read the global average of the
    bottleneck tokens (``head_token: null``; 0 / 1 reproduce the code's rotation / contrast tokens);
    negatives gathered across ranks; the paste partner is always another clean crop
    (``legacy_cutout_partner``); reconstruction over all voxels (``reconstruction_weighting: corrupted``
    averages over the corrupted voxels only); the rotation plane of the code (``axial`` avoids the
    slice-axis shortcut on anisotropic data).

    Args:
        img_size: crop side(s) (96); a non-cubic crop (e.g. 64 × 32 × 32) needs a square rotation plane.
        in_channels: image channels.
        feature_size, depths, num_heads, window_size, drop_path_rate, use_checkpoint: the Swin encoder (v1).
        contrast_dim: width of the contrastive head (512).
        temperature: NT-Xent τ (0.5).
        gather_negatives: negatives from every rank.
        head_token: None = mean of the bottleneck tokens; an int = that flattened token (code: 0 / 1).
        rotation_plane: ``code`` or ``axial``.
        max_cutout_fraction: the U(0, ·) bound of each noise / paste pass (0.3).
        legacy_cutout_partner: the code's partner choice (see above).
        reconstruction_weighting: ``all`` or ``corrupted``.
        rotation_weight, contrast_weight, reconstruction_weight: loss weights (1, 1, 1).
        seed: seed of the rotation / cutout generator (with the global step and rank).
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = 96,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        contrast_dim: int = 512,
        temperature: float = 0.5,
        gather_negatives: bool = True,
        head_token: int | None = None,
        rotation_plane: RotationPlane = "code",
        max_cutout_fraction: float = 0.3,
        legacy_cutout_partner: bool = False,
        reconstruction_weighting: ReconstructionWeighting = "all",
        rotation_weight: float = 1.0,
        contrast_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if rotation_plane not in ("code", "axial"):
            raise ValueError(f"rotation_plane must be 'code' or 'axial', got {rotation_plane!r}")
        if reconstruction_weighting not in ("all", "corrupted"):
            raise ValueError(f"reconstruction_weighting must be 'all' or 'corrupted', got {reconstruction_weighting!r}")
        if not 0.0 <= max_cutout_fraction <= 1.0:
            raise ValueError(f"max_cutout_fraction must be in [0, 1], got {max_cutout_fraction}")
        self.encoder = MaskedSwinEncoder.from_config(
            "swin_unetr", img_size=img_size, in_channels=in_channels, feature_size=feature_size, depths=depths,
            num_heads=num_heads, window_size=window_size, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint)
        self.encoder.remove_mask_token()
        width = self.encoder.stage_channels[-1]
        tokens = 1
        for side in self.encoder.img_size:
            tokens *= side // self.encoder.total_stride
        if tokens < 2:
            raise ValueError(f"img_size must be at least {2 * self.encoder.total_stride} on one axis (the reconstruction "
                             f"head's instance norm needs a bottleneck of more than one voxel), got {img_size}")
        plane = [self.encoder.img_size[d - 2] for d in ROTATION_DIMS[rotation_plane]]
        if plane[0] != plane[1]:
            raise ValueError(f"img_size {list(self.encoder.img_size)}: 90° rotations in the {rotation_plane!r} plane need "
                             f"equal sides on its axes, got {plane}")
        if head_token is not None and not 0 <= head_token < tokens:
            raise ValueError(f"head_token must index one of the {tokens} bottleneck tokens, got {head_token}")
        self.rotation_head = nn.Linear(width, 4)
        self.contrast_head = nn.Linear(width, contrast_dim)
        self.reconstruction_head = VAEUpsampleHead(width, in_channels, self.encoder.total_stride)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.encoder.img_size

    def heads(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rotation logits, contrastive embedding, reconstruction) of a batch of corrupted crops."""
        bottleneck = self.encoder(images)[-1]
        tokens = bottleneck.flatten(2)
        token = self.hparams.head_token
        pooled = tokens.mean(dim=2) if token is None else tokens[:, :, token]
        return self.rotation_head(pooled), self.contrast_head(pooled), self.reconstruction_head(bottleneck)

    def corrupt(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Two rotated, cut-out copies: ``(inputs 2B, targets 2B, rotation labels 2B, changed-voxel masks 2B)``."""
        hp = self.hparams
        inputs, targets, labels, masks = [], [], [], []
        for _ in range(2):
            rotated, turns = random_rotation(images, generator, hp.rotation_plane)
            corrupted, changed = cutout(rotated, generator, hp.max_cutout_fraction, hp.legacy_cutout_partner,
                                        allow_no_partner=not self.training)
            inputs.append(corrupted)
            targets.append(rotated)
            labels.append(turns)
            masks.append(changed)
        return torch.cat(inputs), torch.cat(targets), torch.cat(labels), torch.cat(masks)

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        hp = self.hparams
        images = batch["image"]
        b = images.shape[0]
        inputs, targets, labels, changed = self.corrupt(images.detach(), self.step_generator(self.hparams.seed))
        rotation_logits, embedding, reconstruction = self.heads(inputs)
        rotation = F.cross_entropy(rotation_logits.float(), labels)
        contrast = nt_xent(embedding[:b], embedding[b:], hp.temperature, hp.gather_negatives)
        error = (reconstruction.float() - targets.float()).abs()
        if hp.reconstruction_weighting == "all":
            reconstruct = error.mean()
        else:
            weights = changed.expand_as(error).float()
            reconstruct = (error * weights).sum() / weights.sum().clamp_min(1.0)
        total = hp.rotation_weight * rotation + hp.contrast_weight * contrast + hp.reconstruction_weight * reconstruct
        with torch.no_grad():
            accuracy = (rotation_logits.argmax(1) == labels).float().mean()
        visuals = {}
        if self.capture_visuals:
            visuals = {"rotated": targets[:1], "corrupted": inputs[:1], "reconstruction": reconstruction[:1].detach(),
                       "heat/cutout": changed[:1].float()}
        return StepOutput(
            losses={"loss": total, "rotation": rotation.detach(), "contrast": contrast.detach(),
                    "reconstruction": reconstruct.detach()},
            visuals=visuals,
            scalars={"rotation_accuracy": accuracy, "corrupted_fraction": changed.float().mean()},
        )

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(
            target="swin_unetr",
            state_dict=self.encoder.swin_unetr_state_dict(),
            network_kwargs=self.encoder.swin_unetr_kwargs(),
            metadata={"method": "swinunetr_ssl", "img_size": list(self.input_size)},
        )
