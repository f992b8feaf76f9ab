"""Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021; methods-more §2): restore corrupted sub-volumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mim.backbones.unet import UNet3D
from lightning_mim.corruption.genesis import UNIT_TOLERANCE, GenesisConfig, genesis_corrupt, to_unit_range
from lightning_mim.methods.base import ExportedEncoder, MIMModule, StepOutput

IntensityMapping = Literal["unit", "percentile"]
class ModelsGenesis(MIMModule):
    """A 3D U-Net restores the original sub-volume from a composition of corruptions; encoder + decoder transfer.

    The corruptions (:mod:`lightning_mim.corruption.genesis`) run on the batch inside the step, drawn
    from a generator seeded from ``seed`` and the global step (reproducible, resumable). Output: a
    sigmoid and MSE against the original over all voxels (official), on [0, 1] intensities.

    Choices where the spec is open (flags): flips on the three spatial axes (``legacy_flip_axes``
    reproduces the official channel-axis bug); the number of shuffle blocks scales with the patch
    volume (10,000 per 64×64×32 voxels, capped at 4×); with ``intensity_mapping: percentile`` each
    sample is mapped from its (0.5, 99.5) percentiles to [0, 1] before corruption, so z-scored data
    do not clamp (the nnssl defect) — the target is then in that [0, 1] frame.

    Args:
        img_size: patch side(s) the network is built for.
        in_channels: image channels.
        unet_channels, unet_strides, unet_dropout: our UNet3D (methods.md §2.3).
        flip_rate, legacy_flip_axes, local_rate, shuffle_blocks, nonlinear_rate, paint_rate, inpaint_rate:
            the corruption probabilities (:class:`GenesisConfig`).
        intensity_mapping: ``unit`` (the data must be in [0, 1]; checked) or ``percentile``.
        seed: seed of the corruption generator (combined with the global step and rank).
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = (64, 64, 32),
        in_channels: int = 1,
        unet_channels: Sequence[int] = (64, 128, 256, 512),
        unet_strides: Sequence[int] = (2, 2, 2),
        unet_dropout: float = 0.0,
        flip_rate: float = 0.4,
        legacy_flip_axes: bool = False,
        local_rate: float = 0.5,
        shuffle_blocks: int = 10_000,
        nonlinear_rate: float = 0.9,
        paint_rate: float = 0.9,
        inpaint_rate: float = 0.2,
        intensity_mapping: IntensityMapping = "unit",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, rate in (("flip_rate", flip_rate), ("local_rate", local_rate), ("nonlinear_rate", nonlinear_rate),
                           ("paint_rate", paint_rate), ("inpaint_rate", inpaint_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if intensity_mapping not in ("unit", "percentile"):
            raise ValueError(f"intensity_mapping must be 'unit' or 'percentile', got {intensity_mapping!r}")
        self.img_size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.network = UNet3D(in_channels, in_channels, unet_channels, unet_strides, unet_dropout)
        self.network.check_input_size(self.img_size)
        self.corruption = GenesisConfig(flip_rate, legacy_flip_axes, local_rate, shuffle_blocks, nonlinear_rate,
                                        paint_rate, inpaint_rate)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.img_size

    def restore(self, corrupted: Tensor) -> Tensor:
        return torch.sigmoid(self.network(corrupted).float())

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"].float()
        if self.hparams.intensity_mapping == "percentile":
            images, _, _ = to_unit_range(images)
        elif images.min() < -UNIT_TOLERANCE or images.max() > 1 + UNIT_TOLERANCE:
            raise ValueError(
                f"Models Genesis corrupts [0, 1] intensities but the batch spans [{float(images.min()):.3g}, "
                f"{float(images.max()):.3g}]; use a [0, 1] preprocessing preset or --model.intensity_mapping percentile"
            )
        corrupted, target, record = genesis_corrupt(images.detach(), self.corruption, self.step_generator(self.hparams.seed))
        restored = self.restore(corrupted)
        loss = F.mse_loss(restored, target)
        scalars = {f"fraction_{name}": sum(r[name] for r in record) / len(record)
                   for name in ("shuffle", "bezier", "inpaint", "outpaint")}
        visuals = {}
        if self.capture_visuals:
            visuals = {"target": target, "corrupted": corrupted, "restored": restored.detach(),
                       "heat/error": (restored.detach() - target).abs()}
        return StepOutput(losses={"loss": loss, "restoration_mse": loss.detach()}, visuals=visuals, scalars=scalars)

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(*self.network.export(), {"method": "models_genesis", "img_size": list(self.img_size)})
