"""SMIT (Jiang et al., MICCAI 2022; methods.md §3): SimMIM pixel loss + iBOT-style self-distillation on Swin-3D."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mim.backbones.compositions import TAP_STAGE, SMITNetwork
from lightning_mim.backbones.swin import MaskedSwinEncoder, SwinConfigName
from lightning_mim.heads.dino import drop_last_layer_gradients
from lightning_mim.heads.pixel_shuffle import LinearPixelShuffleDecoder
from lightning_mim.losses.distillation import (
    DistillationCE,
    collapse_monitors,
    cross_view_distillation,
    masked_token_distillation,
)
from lightning_mim.losses.reconstruction import masked_voxel_l1
from lightning_mim.masking.grid import flatten_mask, voxel_mask
from lightning_mim.masking.random import random_cell_mask
from lightning_mim.methods.base import ExportedEncoder, StepOutput
from lightning_mim.methods.teacher_student import TeacherStudentModule, cosine_momentum_per_step
from lightning_mim.schedules import teacher_temperature


class SMIT(TeacherStudentModule):
    """Self-distilled masked image transformer.

    Per step: two overlapping views per volume (``batch["views"]``, ``B×2×C×D×H×W``) → an independent
    16³-cell mask per view → the EMA teacher encodes the *unmasked* views, the student the masked
    ones → masked-voxel L1 through a pixel-shuffle head from the bottleneck (MIP) + masked patch-token
    distillation on the same view (MPD) + global-token distillation across views (ITD).

    Choices where methods.md leaves room (each a flag):

    * ``symmetric_views``: both views masked and given to the student, ITD in both directions (official
      code, default); False is the paper's figure — only view u is masked and seen by the student,
      ITD compares student(û) with teacher(v), MPD and MIP use u only.
    * ``normalize_bottleneck``: the MIP head reads the raw bottleneck (official code); True feeds it the
      non-affine LayerNorm'ed one.
    * Teacher momentum follows the *global* step, ``cosine_momentum(k, K, momentum_start, momentum_end)``
      (not SMIT's per-epoch restart, §3.8); centres are all-reduced under DDP.
    * Teacher temperatures ramp like iBOT/SMIT's ``linspace`` schedules: ``start`` on the first ramp epoch,
      ``end`` on its last (``delay + warmup − 1``), per epoch.

    Args:
        encoder: Swin config (``swin_smit`` default, or ``swin_unetr``).
        img_size: view side the networks are built for (96).
        in_channels: image channels.
        feature_size, depths, num_heads, window_size, qkv_bias, drop_path_rate, drop_rate: encoder
            overrides (None keeps the config's value).
        use_checkpoint: gradient checkpointing in the Swin blocks.
        mask_cell, mask_ratio: mask cells of 16³ voxels, ``ceil(0.7·216) = 152`` masked per view. The
            cell must equal the tap stride (``p·2³``) so every tap token is one cell.
        out_dim, head_hidden_dim, head_bottleneck_dim, head_layers, norm_last_layer, shared_head: DINO heads.
        student_temp, center_momentum: distillation constants (0.1, 0.9).
        teacher_temp_cls_start/end/warmup_epochs: τ1 ramp 0.04 → 0.07 over epochs 0–29.
        teacher_temp_patch_start/end/warmup_epochs/delay_epochs: τ2 0.04 until epoch 30, → 0.07 over 30 epochs.
        mip_weight, patch_weight, cls_weight: loss weights (code: 1 / 0.1 / 0.1).
        momentum_start, momentum_end: teacher EMA momentum schedule end points.
        freeze_last_layer_epochs: epochs during which the heads' last-layer gradients are discarded.
        symmetric_views, normalize_bottleneck: see above.
        **kwargs: optimisation arguments of :class:`MIMModule` (lr, weight_decay, betas, warm-up...).
    """

    def __init__(
        self,
        encoder: SwinConfigName = "swin_smit",
        img_size: int = 96,
        in_channels: int = 1,
        feature_size: int | None = None,
        depths: list[int] | None = None,
        num_heads: list[int] | None = None,
        window_size: int | None = None,
        qkv_bias: bool | None = None,
        drop_path_rate: float | None = None,
        drop_rate: float | None = None,
        use_checkpoint: bool = False,
        mask_cell: int = 16,
        mask_ratio: float = 0.7,
        out_dim: int = 8192,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        shared_head: bool = False,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_temp_cls_start: float = 0.04,
        teacher_temp_cls_end: float = 0.07,
        teacher_temp_cls_warmup_epochs: int = 30,
        teacher_temp_patch_start: float = 0.04,
        teacher_temp_patch_end: float = 0.07,
        teacher_temp_patch_warmup_epochs: int = 30,
        teacher_temp_patch_delay_epochs: int = 30,
        mip_weight: float = 1.0,
        patch_weight: float = 0.1,
        cls_weight: float = 0.1,
        momentum_start: float = 0.996,
        momentum_end: float = 1.0,
        freeze_last_layer_epochs: int = 1,
        symmetric_views: bool = True,
        normalize_bottleneck: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {mask_ratio}")
        momentum = cosine_momentum_per_step(momentum_start, momentum_end)
        swin = MaskedSwinEncoder.from_config(
            encoder, img_size=img_size, in_channels=in_channels, feature_size=feature_size, depths=depths,
            num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate,
            drop_rate=drop_rate, use_checkpoint=use_checkpoint, mask_cell=mask_cell,
        )
        tap_stride = swin.token_patch * 2**TAP_STAGE
        if mask_cell != tap_stride:
            raise ValueError(
                f"SMIT distils one tap token per mask cell: mask_cell must equal the tap stride {tap_stride}, got {mask_cell}"
            )
        self.encoder_config = encoder
        self.student = SMITNetwork(swin, out_dim, head_hidden_dim, head_bottleneck_dim, head_layers, norm_last_layer,
                                   shared_head)
        self.init_teacher(self.student, momentum, exclude=("encoder.mask_token",))
        self.teacher.module.encoder.remove_mask_token()
        self.mip_head = LinearPixelShuffleDecoder(swin.stage_channels[-1], swin.total_stride, in_channels)
        self.cls_criterion = DistillationCE(out_dim, student_temp, center_momentum)
        self.patch_criterion = DistillationCE(out_dim, student_temp, center_momentum)

    @property
    def encoder(self) -> MaskedSwinEncoder:
        return self.student.encoder

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.encoder.img_size

    # ------------------------------------------------------------------ schedules
    def teacher_temperatures(self, epoch: int) -> tuple[float, float]:
        """``(τ1, τ2)`` at ``epoch``; each ramp spans ``warmup`` epochs, ending on ``delay + warmup − 1``."""
        hp = self.hparams
        cls = teacher_temperature(epoch, hp.teacher_temp_cls_warmup_epochs - 1, hp.teacher_temp_cls_start,
                                  hp.teacher_temp_cls_end)
        patch = teacher_temperature(epoch, hp.teacher_temp_patch_warmup_epochs - 1, hp.teacher_temp_patch_start,
                                    hp.teacher_temp_patch_end, hp.teacher_temp_patch_delay_epochs)
        return cls, patch

    # ------------------------------------------------------------------ step
    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        views = batch.get("views")
        if views is None or views.ndim != 6 or views.shape[1] != 2:
            raise ValueError(
                "SMIT needs two views per volume in batch['views'] (B×2×C×D×H×W); configure the data module "
                "with num_views: 2 and view_size"
            )
        hp = self.hparams
        b = views.shape[0]
        stacked = views.transpose(0, 1).reshape(2 * b, *views.shape[2:])  # [view u batch; view v batch]
        student_views = 2 if hp.symmetric_views else 1
        student_images = stacked[: student_views * b]
        cell_masks = random_cell_mask(student_views * b, self.encoder.cell_grid, hp.mask_ratio, device=views.device)

        with torch.no_grad():
            teacher = self.teacher(stacked)
        student = self.student(student_images, self.encoder.token_mask(cell_masks))

        pred = self.mip_head(self.encoder.proj_out(student.bottleneck, hp.normalize_bottleneck))
        voxels = voxel_mask(cell_masks, hp.mask_cell)
        mip = masked_voxel_l1(pred, student_images, voxels)

        temp_cls, temp_patch = self.teacher_temperatures(self.current_epoch)
        k = hp.out_dim
        teacher_cls = self.cls_criterion.teacher_probs(teacher.cls_logits, temp_cls).view(2, b, k)
        teacher_patch = self.patch_criterion.teacher_probs(teacher.patch_logits, temp_patch)
        tokens = teacher_patch.shape[1]
        teacher_patch = teacher_patch.view(2, b, tokens, k)[:student_views]
        patch_distill = masked_token_distillation(
            self.patch_criterion, student.patch_logits.view(student_views, b, tokens, k), teacher_patch,
            flatten_mask(cell_masks).view(student_views, b, tokens),
        )
        pairs = [(0, 1), (1, 0)] if hp.symmetric_views else [(1, 0)]
        cls_distill = cross_view_distillation(self.cls_criterion, student.cls_logits.view(student_views, b, k),
                                              teacher_cls, pairs)
        if self.training:
            self.cls_criterion.update_center(teacher.cls_logits)
            self.patch_criterion.update_center(teacher.patch_logits)

        total = hp.mip_weight * mip + hp.patch_weight * patch_distill + hp.cls_weight * cls_distill
        monitors = collapse_monitors(teacher_cls)
        scalars = {
            "teacher_temp_cls": temp_cls,
            "teacher_temp_patch": temp_patch,
            "teacher_cls_entropy": monitors["entropy"],
            "teacher_cls_kl_uniform": monitors["kl_uniform"],
            "mask_ratio": cell_masks.float().mean(),
        }
        if self.training:
            scalars["teacher_momentum"] = self.teacher_momentum()
        return StepOutput(
            losses={"loss": total, "mip": mip.detach(), "patch_distill": patch_distill.detach(),
                    "cls_distill": cls_distill.detach()},
            visuals=self._visuals(views, pred, voxels, b) if self.capture_visuals else {},
            scalars=scalars,
        )

    def _visuals(self, views: Tensor, pred: Tensor, voxels: Tensor, batch: int) -> dict[str, Tensor]:
        """First sample: view u, both views as the student sees them, u's reconstruction."""
        u, v = views[:1, 0], views[:1, 1]
        mask_u = voxels[:1].bool()
        visuals = {"input": u, "masked_view1": u * ~mask_u}
        if self.hparams.symmetric_views:
            visuals["masked_view2"] = v * ~voxels[batch : batch + 1].bool()
        else:
            visuals["view2"] = v  # the one-sided student never sees v
        visuals["reconstruction"] = torch.where(mask_u, pred[:1].detach().to(u.dtype), u)
        return visuals

    # ------------------------------------------------------------------ hooks
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Discard the heads' last-layer gradients during the first epochs (DINO/iBOT stabiliser)."""
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            drop_last_layer_gradients(self.student.heads())

    def export_encoder(self) -> ExportedEncoder:
        return ExportedEncoder(*self.student.export(), {"method": "SMIT", "encoder_config": self.encoder_config,
                                                        "img_size": list(self.input_size), "source": "student"})
