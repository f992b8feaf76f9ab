"""SelfMedHPM (Lv et al. 2025): MAE-3D whose masks follow an EMA teacher's predicted per-patch losses.

No official code exists; this is HPM (Wang et al., CVPR 2023, methods.md §5.1) on the SelfMedMAE
3D MAE (§5.2). Per step: the EMA teacher sees every token and its loss predictor scores each patch →
the guided mask takes the top ``floor(N·α(epoch))`` patches plus random ones → the student encodes
the visible tokens; its reconstruction branch is trained with the norm-pix MSE on masked patches and
its loss-predictor branch learns to rank the masked patches by their actual (detached) losses.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lightning_mim.heads.mae_decoder import MAEDecoder
from lightning_mim.losses.ranking import pairwise_ranking_loss, spearman_correlation, zscore_regression_loss
from lightning_mim.losses.reconstruction import masked_patch_loss
from lightning_mim.masking.grid import patchify
from lightning_mim.masking.guided import guided_mask
from lightning_mim.masking.random import visible_indices
from lightning_mim.masking.visuals import guided_mask_visuals
from lightning_mim.methods.base import StepOutput
from lightning_mim.methods.mae_base import MaskedAutoencoderBase
from lightning_mim.methods.teacher_student import TeacherStudentModule, momentum_ramp_per_epoch
from lightning_mim.schedules import DifficultyKind


class SelfMedHPM(TeacherStudentModule, MaskedAutoencoderBase):
    """MAE-3D + HPM loss predictor + EMA teacher that chooses the next masks (easy-to-hard).

    The teacher is an EMA of the encoder and both decoder branches (as HPM's ``ModelEma`` of the whole
    model); only its encoder and loss predictor run, on all tokens. Known HPM mismatch (its issue #1):
    the teacher predicts losses from a fully visible input while the student learns them for masked
    tokens — kept, as in HPM.

    Logged besides the losses: ``hard_fraction`` (share of the masked patches chosen by score),
    ``spearman`` (student predicted vs actual loss on the masked tokens), ``ema_momentum``,
    ``mask_ratio``. Panels: input, masked input, reconstruction, ``heat/predicted_loss`` (the
    teacher's per-token prediction) and ``heat/mask`` (0 visible, 1 random, 2 hard).

    Args:
        predictor_dim, predictor_depth, predictor_heads: the loss-predictor branch (a second
            :class:`MAEDecoder` with one output per token); None = same as the reconstruction decoder.
        loss_predictor_weight: ``λ_pred`` in ``L = L_rec + λ_pred·L_pred`` (HPM: 1).
        relative_loss: HPM's pairwise ranking BCE (default); False = MSE to the per-image z-scored
            losses (HPM's non-relative variant).
        difficulty_schedule: ``α(epoch)`` kind (see :func:`lightning_mim.schedules.hard_patch_fraction`);
            HPM's ``easy_to_hard`` is ``α = max_hard_fraction·(e+1)/E``.
        max_hard_fraction: ``α``'s upper value (HPM 0.5).
        ema_momentum_start, ema_momentum_end: EMA decay ramps linearly from start to end …
        ema_ramp, ema_ramp_unit: … over ``E_r`` epochs, given as a fraction of the run (default 0.1·E,
            the choice of methods.md §5.2 for 10,000-epoch runs) or in epochs (HPM: 100).
        **kwargs: :class:`MaskedAutoencoderBase` arguments (ViT, decoder, ``mask_ratio`` — default 0.75; SelfMedMAE's
            BTCV script used 0.125, so sweep {0.125, 0.5, 0.75} — and the optimisation arguments).
    """

    export_name = "selfmedhpm"

    def __init__(
        self,
        predictor_dim: int | None = None,
        predictor_depth: int | None = None,
        predictor_heads: int | None = None,
        loss_predictor_weight: float = 1.0,
        relative_loss: bool = True,
        difficulty_schedule: DifficultyKind = "easy_to_hard",
        max_hard_fraction: float = 0.5,
        ema_momentum_start: float = 0.999,
        ema_momentum_end: float = 0.9999,
        ema_ramp: float = 0.1,
        ema_ramp_unit: Literal["fraction", "epochs"] = "fraction",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if loss_predictor_weight < 0:
            raise ValueError(f"loss_predictor_weight must be >= 0, got {loss_predictor_weight}")
        self.init_guided_masking(difficulty_schedule, max_hard_fraction)
        momentum = momentum_ramp_per_epoch(ema_momentum_start, ema_momentum_end, ema_ramp, ema_ramp_unit)
        hp = self.hparams
        self.loss_predictor = MAEDecoder(
            self.encoder.embed_dim,
            self.encoder.grid,
            1,
            predictor_dim or hp.decoder_dim,
            predictor_depth or hp.decoder_depth,
            predictor_heads or hp.decoder_heads,
            hp.mlp_ratio,
        )
        self.init_teacher(self.student_parts(), momentum)

    def student_parts(self) -> nn.ModuleDict:
        """The networks the teacher mirrors, under the names the teacher uses (not registered twice)."""
        return nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder, "loss_predictor": self.loss_predictor})

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def teacher_predicted_loss(self, images: torch.Tensor) -> torch.Tensor:
        """``B, L`` losses the teacher's predictor expects for every patch, from the unmasked input."""
        teacher = self.teacher.module
        latent = teacher["encoder"](images)
        return teacher["loss_predictor"](latent, None, self.encoder.num_prefix_tokens).squeeze(-1).float()

    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        hp = self.hparams
        images = batch["image"]
        enc = self.encoder
        scores = self.teacher_predicted_loss(images)
        chosen = guided_mask(scores, self.num_masked, self.hard_fraction())
        mask = chosen.mask
        visible = visible_indices(mask)
        latent = enc(images, visible)
        pred = self.decoder(latent, visible, enc.num_prefix_tokens)
        predicted_loss = self.loss_predictor(latent, visible, enc.num_prefix_tokens).squeeze(-1)
        target = patchify(images, enc.patch_size)
        rec_loss, loss_map = masked_patch_loss(pred, target, mask, "l2", hp.norm_pix_loss, hp.norm_pix_unbiased)
        actual = loss_map.detach()
        if hp.relative_loss:
            pred_loss = pairwise_ranking_loss(predicted_loss, actual, mask)
        else:
            pred_loss = zscore_regression_loss(predicted_loss, actual, mask)
        total = rec_loss + hp.loss_predictor_weight * pred_loss

        visuals = {}
        if self.capture_visuals:
            visuals = guided_mask_visuals(images, pred, chosen, scores, "predicted_loss", enc.patch_size, enc.grid,
                                          hp.norm_pix_loss)
        scalars = {
            "hard_fraction": chosen.hard_share(),
            "spearman": spearman_correlation(predicted_loss.detach(), actual, mask).mean(),
            "ema_momentum": self.teacher_momentum(),
            "mask_ratio": mask.float().mean(),
        }
        losses = {"loss": total, "reconstruction": rec_loss.detach(), "loss_prediction": pred_loss.detach()}
        return StepOutput(losses=losses, visuals=visuals, scalars=scalars)
