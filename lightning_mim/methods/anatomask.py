"""AnatoMask (Li et al., ECCV 2024): SparK-style CNN pre-training with reconstruction-guided masks.

Per step (methods.md §4.3): a random initial mask → the EMA teacher reconstructs under it, without
gradients, giving a per-patch loss map (masked patches only, zero elsewhere) → the guided mask hides
the ``floor(N·r(epoch))`` patches the teacher found hardest plus random others → the student
reconstructs under that mask and is trained with the norm-pix MSE on its masked patches. The
teacher only decides where to mask; it contributes no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_mim.backbones.cnn import STUNetEncoder
from lightning_mim.backbones.compositions import SparKNetwork
from lightning_mim.backbones.sparse import NormStatistics
from lightning_mim.backbones.vit import as_triple
from lightning_mim.heads.light_decoder import DecoderNorm
from lightning_mim.losses.ranking import spearman_correlation
from lightning_mim.losses.reconstruction import masked_patch_loss
from lightning_mim.masking.grid import patchify, unflatten_mask
from lightning_mim.masking.guided import guided_mask
from lightning_mim.masking.random import num_masked, random_mask
from lightning_mim.masking.visuals import guided_mask_visuals
from lightning_mim.methods.base import ExportedEncoder, StepOutput
from lightning_mim.methods.teacher_student import TeacherStudentModule, momentum_ramp_per_epoch
from lightning_mim.schedules import DifficultyKind


class AnatoMask(TeacherStudentModule):
    """AnatoMask on a sparse STU-Net encoder with SparK's light decoder.

    Logged besides the loss: ``hard_fraction``, ``spearman`` (teacher map vs the student's actual
    loss on patches hidden under both the initial and the final mask — the others have no teacher
    score), ``ema_momentum``, ``mask_ratio``. Panels: input, masked input, reconstruction,
    ``heat/teacher_loss`` and ``heat/mask`` (0 visible, 1 random, 2 hard). Fine-tune from
    :meth:`export_encoder`; gradient clipping (12 in the recipe) is the Trainer's ``gradient_clip_val``.

    Args:
        img_size: input size (int or 3 sizes); every side must be divisible by the encoder's
            downsample ratio (16 for five stages), because masks live on that coarsest grid. The
            published recipe uses nnU-Net's 112 × 112 × 128 patch (7 × 7 × 8 = 392 cells).
        in_channels: image channels (the decoder reconstructs all of them).
        encoder_dims, encoder_depths: STU-Net stage widths and blocks per stage (B: 32…512, depth 1).
        decoder_width: width of the first decoder block; None = the deepest encoder width (512 for B).
        decoder_norm: ``"batch"`` (code) or ``"instance"`` in the light decoder.
        instance_norm_statistics: sparse instance norms pool the visible voxels of the whole batch
            per channel (``"batch"``, the official code's behaviour, batch-size dependent) or use each
            sample's own visible voxels (``"sample"``).
        mask_ratio: ``γ``; kept cells ``round(L·(1−γ))`` as in SparK (0.6 → 235 of 392 masked).
        difficulty_schedule, max_hard_fraction: ``r(epoch)`` — the code's linear
            ``r_max·(e+1)/(E−1)`` up to ``r_max = 0.5`` by default.
        teacher_raw_target: score patches against the raw voxels, as the official code does, instead
            of the normalised target the network is trained on (default; methods.md §4.6).
        ema_momentum_start, ema_momentum_end, ema_ramp, ema_ramp_unit: teacher decay ramps linearly
            0.999 → 0.9999 over the first quarter of the run (code), or over ``ema_ramp`` epochs.
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int, int] = (112, 112, 128),
        in_channels: int = 1,
        encoder_dims: Sequence[int] = (32, 64, 128, 256, 512),
        encoder_depths: int | Sequence[int] = 1,
        decoder_width: int | None = None,
        decoder_norm: DecoderNorm = "batch",
        instance_norm_statistics: NormStatistics = "batch",
        mask_ratio: float = 0.6,
        difficulty_schedule: DifficultyKind = "anatomask",
        max_hard_fraction: float = 0.5,
        teacher_raw_target: bool = False,
        ema_momentum_start: float = 0.999,
        ema_momentum_end: float = 0.9999,
        ema_ramp: float = 0.25,
        ema_ramp_unit: Literal["fraction", "epochs"] = "fraction",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.init_guided_masking(difficulty_schedule, max_hard_fraction)
        momentum = momentum_ramp_per_epoch(ema_momentum_start, ema_momentum_end, ema_ramp, ema_ramp_unit)
        encoder = STUNetEncoder(in_channels, encoder_dims, encoder_depths)
        self.cell = encoder.downsample_ratio()
        self.img_size = as_triple(img_size)
        if any(s % self.cell for s in self.img_size):
            raise ValueError(
                f"img_size {self.img_size} must be divisible by the encoder's downsample ratio {self.cell} on every "
                f"axis: masks are drawn on the coarsest feature grid (e.g. 112 x 112 x 128 or 64³)"
            )
        self.grid = tuple(s // self.cell for s in self.img_size)
        self.num_cells = self.grid[0] * self.grid[1] * self.grid[2]
        self.num_masked = num_masked(self.num_cells, mask_ratio, "round", by_keep=True)
        if self.num_masked in (0, self.num_cells):
            raise ValueError(f"mask_ratio {mask_ratio} masks {self.num_masked} of {self.num_cells} cells")
        self.network = SparKNetwork(encoder, decoder_width or encoder.dims[-1], in_channels, decoder_norm,
                                    instance_norm_statistics)
        self.init_teacher(self.network, momentum)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.img_size

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def teacher_loss_map(self, images: Tensor, target: Tensor, initial: Tensor) -> Tensor:
        """``B, L`` teacher reconstruction loss per patch under ``initial`` (masked patches only, 0 elsewhere)."""
        pred = patchify(self.teacher(images, unflatten_mask(initial, self.grid)), self.cell)
        norm_pix = not self.hparams.teacher_raw_target
        _, loss_map = masked_patch_loss(pred, target, initial, "l2", norm_pix=norm_pix, unbiased=True)
        return loss_map * initial

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        images = batch["image"]
        if tuple(images.shape[2:]) != self.img_size:
            raise ValueError(f"AnatoMask was built for inputs of {self.img_size}, got {tuple(images.shape[2:])}")
        target = patchify(images, self.cell)
        initial = random_mask(images.shape[0], self.num_cells, self.num_masked, device=images.device)
        scores = self.teacher_loss_map(images, target, initial)
        chosen = guided_mask(scores, self.num_masked, self.hard_fraction())
        mask = chosen.mask
        pred = patchify(self.network(images, unflatten_mask(mask, self.grid)), self.cell)
        loss, student_map = masked_patch_loss(pred, target, mask, "l2", norm_pix=True, unbiased=True)

        visuals = {}
        if self.capture_visuals:
            visuals = guided_mask_visuals(images, pred, chosen, scores, "teacher_loss", self.cell, self.grid, norm_pix=True)
        scalars = {
            "hard_fraction": chosen.hard_share(),
            # Only patches hidden under both masks have a teacher score to compare with.
            "spearman": spearman_correlation(scores, student_map.detach(), mask & initial).mean(),
            "ema_momentum": self.teacher_momentum(),
            "mask_ratio": mask.float().mean(),
        }
        return StepOutput(losses={"loss": loss, "reconstruction": loss.detach()}, visuals=visuals, scalars=scalars)

    # ------------------------------------------------------------------ export
    def export_encoder(self) -> ExportedEncoder:
        """Dense STU-Net encoder weights (this project's :class:`STUNetEncoder` keys) and its constructor args."""
        metadata = {
            "method": "anatomask",
            "roi_size": list(self.img_size),
            "mask_cell": self.cell,
            "mask_ratio": self.hparams.mask_ratio,
        }
        return ExportedEncoder(*self.network.export(), metadata)
