"""HybridMIM (Xing et al., JBHI 2024; methods.md §6): masked modeling at pixel, region and sample level.

One step: random 16³ patch mask → masked voxels filled → encoder (dropout on) → decoder on a sub-box
of every scale → sigmoid → masked MSE inside the box (L_PR); per 32³ region (2³ patches, one
bottleneck cell) a count head (L_Num, 9-way CE) and a location head (L_Loc, 8-bit BCE) plus their
consistency (L_Con); a second encoder pass on the same masked input with a new dropout draw gives
the positive pair of an NT-Xent loss (L_CL). ``L = 1·L_PR + 0.1·L_Num + 0.1·L_Loc + 0.01·L_Con +
0.1·L_CL``. No teacher.

Two encoders: MONAI Swin UNETR (``backbone: swin``; the ``swin_unetr`` config with ``drop_rate=0.1``
— the dropout that makes the contrastive pair) with its residual UNETR decoder, or the DeepUNet
(``backbone: unet``). The decoder is pre-trained too and exported with the encoder.

Choices where the paper/code leave room (all flags):

* region grouping is spatial (``legacy_region_grouping`` reproduces the official consecutive indices);
* the decoded box is ``fixed`` at the far corner as in the code, or ``random`` once per step
  (``partial_box``), of ``partial_box_size`` voxels (default 2/3 of the ROI, on the bottleneck grid);
* the reconstruction mask is the patch mask itself, not "masked input == 0", so ``fill: noise`` works;
* the contrastive embedding is the mean of the bottleneck (``contrastive_token`` picks one flattened
  bottleneck token instead — the official Swin code uses 1); the second pass is gradient-free unless
  ``contrastive_grad_both``; ``gather_negatives`` adds other ranks' samples as negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mim.backbones.compositions import MaskedNetwork, SwinUNETRNetwork
from lightning_mim.backbones.swin import MaskedSwinEncoder, SwinConfigName
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.backbones.vit import as_triple
from lightning_mim.heads.partial_decoder import (
    SubBox,
    crop_to_box,
    default_box_size,
    fixed_box,
    random_box,
)
from lightning_mim.losses.contrastive import nt_xent
from lightning_mim.losses.regions import (
    consistency_loss,
    count_accuracy,
    count_loss,
    location_loss,
    partial_region_loss,
)
from lightning_mim.masking.grid import grid_shape, voxel_mask
from lightning_mim.masking.random import num_masked, random_cell_mask
from lightning_mim.masking.regions import Fill, fill_masked_voxels, region_grid, region_labels
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput

Backbone = Literal["swin", "unet"]
BoxRule = Literal["fixed", "random"]
RatioSampling = Literal["clamped", "uniform"]


class HybridMIM(MIMModule):
    """HybridMIM pre-training of a Swin UNETR or a 3D UNet (encoder and decoder).

    Args:
        backbone: ``swin`` (MONAI Swin UNETR) or ``unet`` (HybridMIM's DeepUNet).
        img_size: input side(s); must equal the data's patch size.
        in_channels: image channels.
        swin_config: Swin preset (``swin_unetr``: F 48, depths 2,2,2,2, heads 3,6,12,24, window 7).
        feature_size, depths, num_heads, window_size: Swin overrides (None keeps the preset).
        drop_rate: Swin dropout on positions, attention projection and MLP (0.1: the contrastive source).
        attn_drop_rate, drop_path_rate: Swin attention dropout / stochastic depth (0 in HybridMIM).
        use_checkpoint: Swin gradient checkpointing (GPU memory).
        unet_channels: UNet channels per level (DeepUNet v2: 64, 64, 128, 256, 512).
        unet_strides: UNet pooling per level after the stem (2, 2, 2, 1 → 12³ bottleneck at 96³).
        unet_dropout: UNet dropout in the stem and decoder blocks (0.1: the contrastive source).
        mask_cell: side of the mask cells in voxels (16), the masking unit shared with SimMIM-3D and SMIT.
        mask_ratio: fraction of patches masked; kept count ``floor(L·(1−r))`` as in the code.
        mask_ratio_range: draw the ratio once per step from this range instead (the code's commented
            alternatives: (0.2, 0.4) for Swin, (0.4, 0.75) for the UNet).
        mask_ratio_sampling: ``clamped`` = ``clamp(U[0, 1), lo, hi)`` as the commented code (mass
            piles up at both ends), ``uniform`` = ``U[lo, hi)``.
        fill: masked voxels set to ``zero`` (code; inputs are in [0.001, 1]) or uniform ``noise`` (figure).
        region_size: patches per region side (2 → regions of 2³ patches = 32³ voxels, one per
            bottleneck cell); the region side must be a multiple of the bottleneck stride.
        legacy_region_grouping: group consecutive flattened patch indices like the official code
            (labels then do not match the bottleneck cell that predicts them).
        partial_box: ``fixed`` (far corner: [32:96) at 96³, the code) or ``random`` (new position
            every step, shared by the batch).
        partial_box_size: side of the decoded box in voxels, a multiple of the bottleneck stride;
            None = 2/3 of the ROI on the bottleneck grid, at least 2 cells (64 at 96³); the ROI
            decodes everything. The box must span more than one bottleneck cell (InstanceNorm).
        projection_dim: width of the shared contrastive projection (384).
        temperature: NT-Xent temperature (0.5).
        contrastive_token: None = mean of all bottleneck tokens; an index = that flattened
            bottleneck token (the official Swin code uses 1).
        gather_negatives: use every rank's samples as negatives (DDP); no-op on one process.
        contrastive_grad_both: back-propagate through the second encoder pass as well.
        weight_partial_region, weight_count, weight_location, weight_consistency, weight_contrastive:
            loss weights (1, 0.1, 0.1, 0.01, 0.1).
        **kwargs: optimisation arguments of :class:`MIMModule` (lr, weight_decay, warmup_steps, ...).
    """

    def __init__(
        self,
        backbone: Backbone = "swin",
        img_size: int | tuple[int, int, int] = 96,
        in_channels: int = 1,
        swin_config: SwinConfigName = "swin_unetr",
        feature_size: int | None = None,
        depths: tuple[int, int, int, int] | None = None,
        num_heads: tuple[int, int, int, int] | None = None,
        window_size: int | None = None,
        drop_rate: float = 0.1,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        unet_channels: tuple[int, ...] = (64, 64, 128, 256, 512),
        unet_strides: tuple[int, ...] = (2, 2, 2, 1),
        unet_dropout: float = 0.1,
        mask_cell: int = 16,
        mask_ratio: float = 0.4,
        mask_ratio_range: tuple[float, float] | None = None,
        mask_ratio_sampling: RatioSampling = "clamped",
        fill: Fill = "zero",
        region_size: int = 2,
        legacy_region_grouping: bool = False,
        partial_box: BoxRule = "fixed",
        partial_box_size: int | tuple[int, int, int] | None = None,
        projection_dim: int = 384,
        temperature: float = 0.5,
        contrastive_token: int | None = None,
        gather_negatives: bool = False,
        contrastive_grad_both: bool = False,
        weight_partial_region: float = 1.0,
        weight_count: float = 0.1,
        weight_location: float = 0.1,
        weight_consistency: float = 0.01,
        weight_contrastive: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        size = as_triple(img_size)
        if backbone not in NETWORKS:
            raise ValueError(f"unknown backbone {backbone!r}; choose {' or '.join(map(repr, NETWORKS))}")
        network, self.network_metadata = NETWORKS[backbone](size, in_channels, self.hparams)
        # The method registers the network's parts under their own names (checkpoint keys ``encoder.*`` and
        # ``decoder.*``); the composition itself is a plain reference, so nothing is saved twice.
        self.encoder, self.decoder = network.encoder, network.decoder
        object.__setattr__(self, "network", network)
        bottleneck_channels, stride = network.bottleneck_channels, network.total_stride

        self.backbone, self.img_size = backbone, size
        self.cell_grid = grid_shape(size, mask_cell)
        self.region_grid = region_grid(self.cell_grid, region_size)
        region_side = mask_cell * region_size
        if region_side % stride:
            raise ValueError(f"a region of {region_size}³ patches of {mask_cell}³ ({region_side} voxels) must "
                             f"cover whole bottleneck cells of {stride} voxels")
        self.region_pool = region_side // stride
        self.bottleneck_grid = tuple(s // stride for s in size)
        self.box_size = self._box_size(partial_box_size, stride)
        if self.box_size[0] * self.box_size[1] * self.box_size[2] < 2:
            raise ValueError(f"the decoded box covers one bottleneck cell ({stride}³ voxels), which InstanceNorm cannot "
                             f"normalise while training; use a larger partial_box_size or ROI (≥ {2 * stride} on an axis)")
        if partial_box not in ("fixed", "random"):
            raise ValueError(f"unknown partial_box {partial_box!r}; choose 'fixed' or 'random'")
        self.mask_ratio_range = self._check_ratios(mask_ratio, mask_ratio_range, mask_ratio_sampling)
        if fill not in ("zero", "noise"):
            raise ValueError(f"unknown fill {fill!r}; choose 'zero' or 'noise'")
        num_regions = self.region_grid[0] * self.region_grid[1] * self.region_grid[2]
        if contrastive_token is not None and not 0 <= contrastive_token < num_regions * self.region_pool**3:
            raise ValueError(f"contrastive_token {contrastive_token} is outside the bottleneck's "
                             f"{num_regions * self.region_pool**3} tokens")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")

        cells = region_size**3
        self.count_head = nn.Linear(bottleneck_channels, cells + 1)
        self.location_head = nn.Linear(bottleneck_channels, cells)
        self.projection = nn.Linear(bottleneck_channels, projection_dim)
        self.mask_cell, self.region_size = mask_cell, region_size
        self.loss_weights = {"partial_region": weight_partial_region, "count": weight_count,
                             "location": weight_location, "consistency": weight_consistency,
                             "contrastive": weight_contrastive}

    # ------------------------------------------------------------------ construction checks
    def _box_size(self, voxels: int | tuple[int, int, int] | None, stride: int) -> tuple[int, int, int]:
        if voxels is None:
            return default_box_size(self.bottleneck_grid)
        sides = as_triple(voxels)
        if any(v % stride or not 0 < v <= s for v, s in zip(sides, self.img_size)):
            raise ValueError(f"partial_box_size {sides} must be a positive multiple of the bottleneck stride {stride} "
                             f"within the ROI {self.img_size}")
        return tuple(v // stride for v in sides)

    def _check_ratios(self, ratio: float, ratio_range: tuple[float, float] | None,
                      sampling: RatioSampling) -> tuple[float, float] | None:
        total = self.cell_grid[0] * self.cell_grid[1] * self.cell_grid[2]
        num_masked(total, ratio, "floor", by_keep=True)  # raises on a bad ratio
        if sampling not in ("clamped", "uniform"):
            raise ValueError(f"unknown mask_ratio_sampling {sampling!r}; choose 'clamped' or 'uniform'")
        if ratio_range is None:
            return None
        low, high = (float(v) for v in ratio_range)
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high < 1, got {ratio_range}")
        return low, high

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.img_size

    # ------------------------------------------------------------------ pieces of a step
    def draw_mask_ratio(self) -> float:
        if self.mask_ratio_range is None:
            return self.hparams.mask_ratio
        low, high = self.mask_ratio_range
        u = float(torch.rand(()))
        if self.hparams.mask_ratio_sampling == "clamped":
            return min(max(u, low), high)
        return low + (high - low) * u

    def choose_box(self) -> SubBox:
        if self.hparams.partial_box == "random":
            return random_box(self.bottleneck_grid, self.box_size)
        return fixed_box(self.bottleneck_grid, self.box_size)

    def encode(self, images: Tensor) -> list[Tensor]:
        """Feature maps of every scale, bottleneck last (Swin: stage outputs after the non-affine LayerNorm)."""
        return self.network.encode(images)

    def decode(self, images: Tensor, features: list[Tensor], box: SubBox | None) -> Tensor:
        return self.network.decode(images, features, box=box)

    def region_features(self, bottleneck: Tensor) -> Tensor:
        """``B, R, C_b``: the bottleneck averaged over each region (identity pooling for Swin), row-major."""
        if self.region_pool > 1:
            bottleneck = F.avg_pool3d(bottleneck, self.region_pool)
        return bottleneck.flatten(2).transpose(1, 2)

    def embedding(self, bottleneck: Tensor) -> Tensor:
        """Contrastive embedding before projection: mean over the bottleneck, or one flattened token."""
        tokens = bottleneck.flatten(2)
        token = self.hparams.contrastive_token
        return tokens.mean(dim=2) if token is None else tokens[:, :, token]

    # ------------------------------------------------------------------ step
    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        hp = self.hparams
        ratio = self.draw_mask_ratio()
        mask = random_cell_mask(images.shape[0], self.cell_grid, ratio, rounding="floor", by_keep=True,
                                device=images.device)
        labels = region_labels(mask, self.region_size, hp.legacy_region_grouping)
        masked_input = fill_masked_voxels(images, mask, self.mask_cell, hp.fill)

        features = self.encode(masked_input)
        box = self.choose_box()
        reconstruction = torch.sigmoid(self.decode(masked_input, features, box).float())
        masked_voxels = crop_to_box(voxel_mask(mask, self.mask_cell), box, self.bottleneck_grid)
        target = crop_to_box(images, box, self.bottleneck_grid)
        terms = {"partial_region": partial_region_loss(reconstruction, target, masked_voxels)}

        regions = self.region_features(features[-1])
        count_logits, location_logits = self.count_head(regions), self.location_head(regions)
        terms["count"] = count_loss(count_logits, labels.counts)
        terms["location"] = location_loss(location_logits, labels.patterns)
        terms["consistency"] = consistency_loss(count_logits, location_logits)

        # Same masked input, new dropout draw: the pair differs only by dropout (SimCSE-style).
        if hp.contrastive_grad_both:
            twin = self.encode(masked_input)[-1]
        else:
            with torch.no_grad():
                twin = self.encode(masked_input)[-1]
        first, second = self.projection(self.embedding(features[-1])), self.projection(self.embedding(twin))
        terms["contrastive"] = nt_xent(first, second, hp.temperature, hp.gather_negatives)

        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        losses = {"loss": total, **{name: value.detach() for name, value in terms.items()}}
        scalars = {
            "count_accuracy": count_accuracy(count_logits.detach(), labels.counts),
            "location_accuracy": ((location_logits.detach() > 0).float() == labels.patterns).float().mean(),
            "mask_ratio": mask.float().mean(),
        }
        visuals = self._visuals(images, masked_input, reconstruction, box, mask) if self.capture_visuals else {}
        return StepOutput(losses=losses, visuals=visuals, scalars=scalars)

    def _visuals(self, images: Tensor, masked_input: Tensor, reconstruction: Tensor, box: SubBox,
                 mask: Tensor) -> dict[str, Tensor]:
        """Input, masked input, and the masked input with the box's masked voxels reconstructed."""
        first = masked_input[:1].detach()
        pasted = first.clone()
        slices = box.voxel_slices([s // g for s, g in zip(self.img_size, self.bottleneck_grid)])
        inside = crop_to_box(voxel_mask(mask[:1], self.mask_cell), box, self.bottleneck_grid).bool()
        region = pasted[(..., *slices)]
        pasted[(..., *slices)] = torch.where(inside, reconstruction[:1].detach().to(region.dtype), region)
        return {"input": images[:1], "masked": first, "reconstruction": pasted,
                "heat/mask": voxel_mask(mask[:1], self.mask_cell)}

    # ------------------------------------------------------------------ export
    def export_encoder(self) -> ExportedEncoder:
        """Encoder **and** decoder weights (the output layer excluded: the class count differs).

        Swin: MONAI ``SwinUNETR`` key layout (``swinViT.*``, ``encoder1..4``, ``encoder10``,
        ``decoder1..5``) for ``SwinUNETR(out_channels=K, **network_kwargs)``. UNet:
        :class:`~lightning_mim.backbones.unet.UNet3D` keys (``encoder.*``, ``decoder.*``) for
        ``UNet3D(out_channels=K, **network_kwargs)``; decode the full volume when fine-tuning.
        """
        hp = self.hparams
        metadata = {"method": "hybridmim", "backbone": self.backbone, "img_size": list(self.img_size),
                    "mask_cell": self.mask_cell, "mask_ratio": hp.mask_ratio, "fill": hp.fill, **self.network_metadata}
        return ExportedEncoder(*self.network.export(), metadata)


def swin_network(size: tuple[int, int, int], in_channels: int, hp: Any) -> tuple[SwinUNETRNetwork, dict[str, Any]]:
    encoder = MaskedSwinEncoder.from_config(
        hp.swin_config, img_size=size, in_channels=in_channels, feature_size=hp.feature_size, depths=hp.depths,
        num_heads=hp.num_heads, window_size=hp.window_size, drop_rate=hp.drop_rate, attn_drop_rate=hp.attn_drop_rate,
        drop_path_rate=hp.drop_path_rate, use_checkpoint=hp.use_checkpoint,
        # MONAI's SDPA path skips attention dropout, which would silently change the no-grad twin.
        use_flash_attention=hp.attn_drop_rate == 0,
    )
    encoder.remove_mask_token()  # HybridMIM fills voxels; an unused token would upset DDP
    return SwinUNETRNetwork(encoder, in_channels, in_channels), {"swin_config": hp.swin_config}


def unet_network(size: tuple[int, int, int], in_channels: int, hp: Any) -> tuple[UNet3D, dict[str, Any]]:
    unet = UNet3D(in_channels, in_channels, hp.unet_channels, hp.unet_strides, hp.unet_dropout)
    unet.check_input_size(size)
    return unet, {}


#: HybridMIM's networks by ``backbone``: ``(ROI, in_channels, hparams) → (network, extra export metadata)``.
NETWORKS: dict[str, Callable[[tuple[int, int, int], int, Any], tuple[MaskedNetwork, dict[str, Any]]]] = {
    "swin": swin_network,
    "unet": unet_network,
}
