"""VoCo — Volume Contrast (Wu, Zhuang, Chen; CVPR 2024 / TPAMI code; methods-more §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mim.backbones.compositions import VoCoBackbone
from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.corruption.multicrop import augment_crops
from lightning_mim.heads.projector import MLPProjector
from lightning_mim.losses.voco import (
    NegativeForm,
    base_crop_starts,
    online_assign,
    orthogonality_loss,
    overlap_labels,
    position_loss,
)
from lightning_mim.methods.base import ExportedEncoder, StepOutput
from lightning_mim.methods.teacher_student import TeacherStudentModule, constant_momentum
from lightning_mim.teachers import EMATeacher

TeacherKind = Literal["none", "projector", "full"]
class VoCo(TeacherStudentModule):
    """Random crops regress their overlap with a grid of base crops from pooled-feature similarities.

    The data module delivers one ``grid × crop`` region per item (``patch_size``). Per volume the
    step cuts the ``K`` base crops, draws ``R`` random crops inside the region (``y`` = their volumetric
    overlap fractions), augments every crop independently, and forwards all crops of the rank in
    one call (the projector's BatchNorm sees the whole mix, as in the code).

    ``teacher``: ``projector`` (TPAMI code: an EMA copy of the projector on clean features, the student
    on feature-dropped ones, plus the inter-volume term), ``full`` (CVPR code: an EMA copy of backbone
    and projector, symmetric assignment) or ``none`` (the paper; base embeddings detached in the
    prediction as in the V1 code — known not to train well, nnssl#22). EMA momentum is constant
    (0.9), applied after every optimizer step; the teacher starts as a copy of the student.

    Args:
        crop_size: base/random crop side (64; a multiple of the Swin stride 32 — at 32 the encoder10 block sees one
            voxel and stays at its initialisation, see :func:`residual_block`).
        grid: base crops per axis (3, 3, 1); the region is ``grid × crop_size``.
        num_random_crops: random crops per volume (2).
        in_channels: image channels.
        feature_size, depths, num_heads, window_size, use_checkpoint: the Swin encoder (F 48).
        projector_hidden_dim, projector_dim: projector widths (TPAMI 1024, 1024).
        teacher: see above. teacher_momentum: EMA momentum (0.9).
        inter_volume: the TPAMI inter-volume term (needs a teacher and ≥ 2 volumes per process).
        negative_form: ``log`` (TPAMI) or ``square`` (CVPR).
        feature_dropout: dropout on the student's pooled features (TPAMI 0.2); element-wise by default,
            ``legacy_sample_dropout`` drops whole embeddings as the code's ``Dropout1d`` on a 2-D input does.
        flip_prob, rotate_prob, shift_prob, intensity_shift: per-crop augmentation (0.2, 0.2, 0.5, 0.1).
        position_weight, regularization_weight, inter_weight: loss weights (1, 1, 1).
        seed: seed of the crop / augmentation generator (with the global step and rank).
        **kwargs: optimisation arguments of :class:`MIMModule`.
    """

    def __init__(
        self,
        crop_size: int = 64,
        grid: tuple[int, int, int] = (3, 3, 1),
        num_random_crops: int = 2,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        use_checkpoint: bool = False,
        projector_hidden_dim: int = 1024,
        projector_dim: int = 1024,
        teacher: TeacherKind = "projector",
        teacher_momentum: float = 0.9,
        inter_volume: bool = True,
        negative_form: NegativeForm = "log",
        feature_dropout: float = 0.2,
        legacy_sample_dropout: bool = False,
        flip_prob: float = 0.2,
        rotate_prob: float = 0.2,
        shift_prob: float = 0.5,
        intensity_shift: float = 0.1,
        position_weight: float = 1.0,
        regularization_weight: float = 1.0,
        inter_weight: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) < 1 or grid[0] * grid[1] * grid[2] < 2:
            raise ValueError(f"grid must be three positive counts with at least 2 base crops, got {grid}")
        if num_random_crops < 1:
            raise ValueError(f"num_random_crops must be ≥ 1, got {num_random_crops}")
        if teacher not in ("none", "projector", "full"):
            raise ValueError(f"teacher must be 'none', 'projector' or 'full', got {teacher!r}")
        if inter_volume and teacher == "none":
            raise ValueError("the inter-volume term compares against the teacher: set inter_volume false with teacher none")
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {feature_dropout}")
        if negative_form not in ("log", "square"):
            raise ValueError(f"negative_form must be 'log' or 'square', got {negative_form!r}")
        momentum = constant_momentum(teacher_momentum)
        swin = MaskedSwinEncoder.from_config("swin_unetr", img_size=crop_size, in_channels=in_channels,
                                             feature_size=feature_size, depths=depths, num_heads=num_heads,
                                             window_size=window_size, use_checkpoint=use_checkpoint)
        swin.remove_mask_token()
        self.grid, self.crop = grid, (crop_size,) * 3
        self.backbone = VoCoBackbone(swin, in_channels)
        self.projector = MLPProjector(self.backbone.feature_dim, projector_hidden_dim, projector_dim, 3, "batch")
        self.dropout = nn.Dropout(feature_dropout)
        self.teacher: EMATeacher | None = None
        if teacher == "projector":
            self.init_teacher(self.projector, momentum)
        elif teacher == "full":
            self.init_teacher(nn.ModuleDict({"backbone": self.backbone, "projector": self.projector}), momentum)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(g * c for g, c in zip(self.grid, self.crop))

    @property
    def num_bases(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    # ------------------------------------------------------------------ crops
    def sample_crops(self, regions: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(crops B·(R+K), random-crop starts B, R, 3, overlap targets B, R, K)``; per volume R random then K bases."""
        if tuple(regions.shape[2:]) != self.input_size:
            raise ValueError(f"VoCo expects regions of {self.input_size} voxels (grid × crop), got {tuple(regions.shape[2:])}")
        hp = self.hparams
        bases = base_crop_starts(self.grid, self.crop)
        limits = [s - c + 1 for s, c in zip(self.input_size, self.crop)]
        crops, starts = [], []
        for region in regions:
            random = torch.stack([torch.randint(0, lim, (hp.num_random_crops,), generator=generator) for lim in limits], 1)
            starts.append(random)
            for a, b, c in torch.cat([random, bases]).tolist():
                crops.append(region[:, a : a + self.crop[0], b : b + self.crop[1], c : c + self.crop[2]])
        crops_t = augment_crops(torch.stack(crops), generator, hp.flip_prob, hp.rotate_prob, hp.shift_prob,
                                hp.intensity_shift)
        starts_t = torch.stack(starts)
        targets = torch.stack([overlap_labels(s, self.grid, self.crop) for s in starts_t]).to(regions.device)
        return crops_t, starts_t, targets

    def drop_features(self, features: Tensor) -> Tensor:
        p = self.hparams.feature_dropout
        if p == 0:
            return features
        if self.hparams.legacy_sample_dropout:  # Dropout1d on (B, D) zeroes whole rows, always in train mode
            keep = (torch.rand(features.shape[0], 1, device=features.device) >= p).to(features.dtype)
            return features * keep / (1 - p)
        return self.dropout(features)

    # ------------------------------------------------------------------ step
    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        hp = self.hparams
        regions = batch["image"]
        b, r, k = regions.shape[0], hp.num_random_crops, self.num_bases
        crops, starts, targets = self.sample_crops(regions.detach(), self.step_generator(self.hparams.seed))
        features = self.backbone(crops)
        student = self.projector(self.drop_features(features)).view(b, r + k, -1)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                if hp.teacher == "projector":
                    teacher = self.teacher(features.detach())
                else:
                    module = self.teacher.module
                    teacher = module["projector"](module["backbone"](crops))
                teacher = teacher.view(b, r + k, -1)
        z, q = student[:, :r], student[:, r:]
        if teacher is None:
            similarity = online_assign(z, q.detach())
        elif hp.teacher == "projector":
            similarity = online_assign(z, teacher[:, r:])
        else:  # CVPR code: symmetric student/teacher assignment
            similarity = 0.5 * (online_assign(z, teacher[:, r:]) + online_assign(teacher[:, :r], q))
        pos_terms, neg_terms, reg_terms = [], [], []
        for n in range(b):
            pos, neg = position_loss(similarity[n], targets[n], hp.negative_form)
            pos_terms.append(pos)
            neg_terms.append(neg)
            reg_terms.append(orthogonality_loss(q[n]))
        pos, neg, reg = (torch.stack(t).mean() for t in (pos_terms, neg_terms, reg_terms))
        losses = {"position": pos.detach(), "negative": neg.detach(), "regularization": reg.detach()}
        total = hp.position_weight * (pos + neg) + hp.regularization_weight * reg
        if hp.inter_volume and teacher is not None and (b >= 2 or self.training):
            if b < 2:
                raise ValueError("the VoCo inter-volume term pairs volumes of one process: use batch_size ≥ 2")
            partner = torch.arange(b).roll(-1)
            inter_terms = []
            for n in range(b):
                with torch.no_grad():
                    target = online_assign(teacher[n, :r], teacher[partner[n], r:])
                predicted = online_assign(z[n], q[partner[n]])
                inter_terms.append(sum(position_loss(predicted, target, hp.negative_form)))
            inter = torch.stack(inter_terms).mean()
            losses["inter_volume"] = inter.detach()
            total = total + hp.inter_weight * inter
        visuals = self._visuals(regions, crops, starts, targets, r + k) if self.capture_visuals else {}
        with torch.no_grad():
            error = (similarity - targets).abs().mean()
        return StepOutput(losses={"loss": total, **losses}, visuals=visuals,
                          scalars={"overlap_abs_error": error})

    def _visuals(self, regions: Tensor, crops: Tensor, starts: Tensor, targets: Tensor, per_volume: int) -> dict[str, Tensor]:
        """First volume: the region, random crop 0's footprint over the base grid, that crop and its best base crop."""
        a, b, c = starts[0, 0].tolist()
        footprint = torch.zeros_like(regions[:1])
        footprint[..., a : a + self.crop[0], b : b + self.crop[1], c : c + self.crop[2]] = 1.0
        for axis, (g, size) in enumerate(zip(self.grid, self.crop)):  # grid lines at the base-crop borders
            for line in range(1, g):
                index = [slice(None)] * 5
                index[2 + axis] = line * size
                footprint[tuple(index)] = 0.5
        best = int(targets[0, 0].argmax())
        r = self.hparams.num_random_crops
        return {"region": regions[:1], "heat/random_crop_and_grid": footprint, "random_crop": crops[:1],
                "best_base_crop": crops[r + best : r + best + 1]}

    def export_encoder(self) -> ExportedEncoder:
        """The Swin encoder and the pre-trained ``encoder1..4``/``encoder10`` blocks, for MONAI ``SwinUNETR``."""
        return ExportedEncoder(*self.backbone.export(),
                               {"method": "voco", "teacher": self.hparams.teacher, "crop_size": list(self.crop)})
