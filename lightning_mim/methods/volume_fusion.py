"""Volume Fusion (Wang et al., arXiv 2306.16925; methods-more §3): segment the fusion coefficients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from monai.losses import DiceCELoss
from torch import Tensor

from lightning_mim.backbones.unet import UNet3D
from lightning_mim.corruption.fusion import fuse, grid_block_labels, random_box_labels
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput

FusionMode = Literal["cross_volume_boxes", "grid_same_volume"]


class VolumeFusion(MIMModule):
    """Fuse two sub-volumes with a piecewise-constant discrete α map; a UNet predicts the K + 1 classes.

    * ``cross_volume_boxes`` (paper / PyMIC batch version, default): M ~ U{10..40} random clipped
      boxes; the foreground of sample n is sample n − 1 of the batch (roll by one), so each rank needs
      ≥ 2 samples in training (checked); a validation batch of one is fused with its own mirror image.
    * ``grid_same_volume`` (current PyMIC): two crops of the same volume (``num_views: 2``), a block
      grid with ⌊0.7·cells⌋ labelled cells.

    Labels are drawn inside the step from a generator seeded by (seed, global step, rank).
    Loss: Dice (background included, per sample, smooth 1e-5) + CE, 1 : 1 (MONAI ``DiceCELoss``).
    Encoder **and** decoder transfer (the output layer is replaced).

    Args:
        img_size: patch side(s) the network is built for.
        in_channels: image channels.
        unet_channels, unet_strides, unet_dropout: our UNet3D.
        num_classes: K + 1 (5: α ∈ {0, ¼, ½, ¾, 1}).
        mode: the generator, see above.
        box_range: the number of boxes per sample (cross-volume mode).
        size_fraction_min, size_fraction_max: box sides as fractions of the patch, per axis in tensor
            (RAS x, y, z) order: the official 8–80 of 128 in-plane and 8–40 of 64 slices.
        grid_fraction: fraction of grid cells labelled (grid mode).
        dice_weight, ce_weight: loss weights.
        seed: seed of the label generator.
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = (128, 128, 64),
        in_channels: int = 1,
        unet_channels: Sequence[int] = (32, 64, 128, 256, 512),
        unet_strides: Sequence[int] = (2, 2, 2, 2),
        unet_dropout: float = 0.0,
        num_classes: int = 5,
        mode: FusionMode = "cross_volume_boxes",
        box_range: tuple[int, int] = (10, 40),
        size_fraction_min: tuple[float, float, float] = (0.0625, 0.0625, 0.125),
        size_fraction_max: tuple[float, float, float] = (0.625, 0.625, 0.625),
        grid_fraction: float = 0.7,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be ≥ 2 (K + 1 with K ≥ 1), got {num_classes}")
        if mode not in ("cross_volume_boxes", "grid_same_volume"):
            raise ValueError(f"mode must be 'cross_volume_boxes' or 'grid_same_volume', got {mode!r}")
        if not 1 <= box_range[0] <= box_range[1]:
            raise ValueError(f"box_range must be (low, high) with 1 ≤ low ≤ high, got {box_range}")
        self.img_size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.network = UNet3D(in_channels, num_classes, unet_channels, unet_strides, unet_dropout)
        self.network.check_input_size(self.img_size)
        self.criterion = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, smooth_nr=1e-5,
                                    smooth_dr=1e-5, batch=False, lambda_dice=dice_weight, lambda_ce=ce_weight)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.img_size

    def pair_and_labels(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(foreground, background, labels)`` for the configured mode."""
        hp = self.hparams
        if hp.mode == "grid_same_volume":
            views = batch.get("views")
            if views is None or views.ndim != 6 or views.shape[1] != 2:
                raise ValueError("Volume Fusion grid_same_volume fuses two crops of one volume: configure the data "
                                 "module with num_views: 2 and a view_size")
            foreground, background = views[:, 0], views[:, 1]
            labels = grid_block_labels((foreground.shape[0], *foreground.shape[2:]), hp.num_classes,
                                       fraction=hp.grid_fraction, generator=generator)
        else:
            background = batch["image"]
            if background.shape[0] >= 2:
                foreground = background.roll(1, dims=0)
            elif not self.training:  # a last validation batch of one: its own mirror image as the partner
                foreground = background.flip((2, 3, 4))
            else:
                raise ValueError("Volume Fusion cross_volume_boxes pairs each sample with the previous one of the "
                                 "batch: use batch_size ≥ 2 per process (with 1 a volume is fused with itself)")
            labels = random_box_labels((background.shape[0], *background.shape[2:]), hp.num_classes,
                                       tuple(hp.box_range), hp.size_fraction_min, hp.size_fraction_max,
                                       generator=generator)
        return foreground, background, labels.to(background.device)

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        foreground, background, labels = self.pair_and_labels(batch, self.step_generator(self.hparams.seed))
        fused = fuse(foreground, background, labels, self.hparams.num_classes)
        logits = self.network(fused)
        loss = self.criterion(logits.float(), labels.unsqueeze(1))
        prediction = logits.detach().argmax(1)
        accuracy = (prediction == labels).float().mean()
        visuals = {}
        if self.capture_visuals:
            k = self.hparams.num_classes - 1
            visuals = {"background": background, "foreground": foreground, "fused": fused,
                       "heat/alpha_label": labels.unsqueeze(1).float() / k,
                       "heat/alpha_predicted": prediction.unsqueeze(1).float() / k}
        return StepOutput(losses={"loss": loss, "dice_ce": loss.detach()}, visuals=visuals,
                          scalars={"voxel_accuracy": accuracy})

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(*self.network.export(), {"method": "volume_fusion", "img_size": list(self.img_size),
                                                         "num_classes": self.hparams.num_classes,
                                                         "mode": self.hparams.mode})
