"""The base of every method with an EMA teacher (SMIT, AnatoMask, SelfMedHPM, DINOv2-3D, VoCo).

One place for what these methods share: the teacher's creation, its momentum schedule, the EMA update
after every real optimizer step (which :class:`MIMModule` skips when the NaN guard dropped the step's
update, so a dropped step leaves the teacher as it was), the checks of the shared arguments, and the
per-epoch difficulty of teacher-guided masks (SelfMedHPM, AnatoMask).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from torch import nn

from lightning_mim.methods.base import MIMModule
from lightning_mim.optimisation import trainer_run_length
from lightning_mim.schedules import DifficultyKind, MomentumSchedule, hard_patch_fraction
from lightning_mim.teachers import EMATeacher


def _check_momentum(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def cosine_momentum_per_step(momentum_start: float, momentum_end: float) -> MomentumSchedule:
    """DINO/iBOT/SMIT: cosine from ``momentum_start`` to ``momentum_end`` over the run's optimizer steps."""
    if not 0.0 <= momentum_start <= momentum_end <= 1.0:
        raise ValueError(f"need 0 ≤ momentum_start ≤ momentum_end ≤ 1, got {momentum_start}, {momentum_end}")
    return MomentumSchedule("cosine_per_step", momentum_start, momentum_end)


def momentum_ramp_per_epoch(ema_momentum_start: float, ema_momentum_end: float, ema_ramp: float,
                            ema_ramp_unit: Literal["epochs", "fraction"]) -> MomentumSchedule:
    """HPM/AnatoMask: linear from start to end over ``ema_ramp`` epochs (or that fraction of the run), then constant."""
    _check_momentum("ema_momentum_start", ema_momentum_start)
    _check_momentum("ema_momentum_end", ema_momentum_end)
    if ema_ramp < 0:
        raise ValueError(f"ema_ramp must be >= 0 (epochs, or a fraction of the run), got {ema_ramp}")
    if ema_ramp_unit not in ("epochs", "fraction"):
        raise ValueError(f"ema_ramp_unit must be 'epochs' or 'fraction', got {ema_ramp_unit!r}")
    return MomentumSchedule("ramp_per_epoch", ema_momentum_start, ema_momentum_end, ema_ramp, ema_ramp_unit)


def constant_momentum(teacher_momentum: float) -> MomentumSchedule:
    """One momentum for the whole run (VoCo)."""
    _check_momentum("teacher_momentum", teacher_momentum)
    return MomentumSchedule("constant", teacher_momentum, teacher_momentum)


class TeacherStudentModule(MIMModule):
    """A :class:`MIMModule` whose EMA teacher follows a student network.

    A method builds its student in its constructor, then calls :meth:`init_teacher` with a schedule from
    :func:`cosine_momentum_per_step`, :func:`momentum_ramp_per_epoch` or :func:`constant_momentum` (each
    checks its arguments under the names the recipes use); a method whose teacher chooses the masks also
    calls :meth:`init_guided_masking`. The base then updates the teacher after every real optimizer
    step (once per accumulation cycle, never after a step the NaN guard dropped).

    Without a trainer (unit tests) the module behaves as step 0 / epoch 0 of a 1-epoch run.
    """

    def init_teacher(self, student: nn.Module, momentum: MomentumSchedule,
                     exclude: tuple[str, ...] = ()) -> EMATeacher:
        """Create ``self.teacher``, a frozen copy of ``student`` (parameters under ``exclude`` are not followed).

        ``student`` may be a container built on the fly (SelfMedHPM's ``ModuleDict`` of its encoder and
        decoders): it is kept as a plain reference, not registered, so its parameters are not saved twice.
        """
        self.teacher = EMATeacher(student, exclude)
        object.__setattr__(self, "_teacher_student", student)
        self.momentum_schedule = momentum
        return self.teacher

    def teacher_momentum(self) -> float:
        """EMA momentum for the update that follows optimizer step ``global_step`` (in ``current_epoch``)."""
        schedule = self.momentum_schedule
        if schedule.per_step:
            total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
            return schedule.at(self.global_step, total)
        return schedule.at(self.current_epoch, self.planned_epochs())

    def after_optimizer_step(self) -> None:
        if getattr(self, "teacher", None) is not None:  # VoCo can run without a teacher
            self.teacher.update(self._teacher_student, self.teacher_momentum())

    # ------------------------------------------------------------------ guided masking
    def init_guided_masking(self, difficulty_schedule: DifficultyKind, max_hard_fraction: float) -> None:
        """Masks whose hardest ``α(epoch)`` share the teacher picks (see :func:`hard_patch_fraction`)."""
        if difficulty_schedule not in get_args(DifficultyKind):
            raise ValueError(f"difficulty_schedule must be one of {get_args(DifficultyKind)}, got {difficulty_schedule!r}")
        if not 0.0 <= max_hard_fraction <= 1.0:
            raise ValueError(f"max_hard_fraction must be in [0, 1], got {max_hard_fraction}")
        self.difficulty = (difficulty_schedule, max_hard_fraction)

    def planned_epochs(self) -> int:
        """Epochs this run trains: ``max_epochs``, or fewer where ``max_steps`` ends the run first.

        Per-epoch schedules (guided masking's ``α``, the EMA ramp) must span the run that happens: a
        step budget under a recipe's ``max_epochs: 1000`` would otherwise leave them at their start.
        """
        trainer = self._trainer
        max_epochs = getattr(trainer, "max_epochs", None)
        epochs = int(max_epochs) if max_epochs and max_epochs > 0 else 1
        max_steps = getattr(trainer, "max_steps", -1)
        if max_steps is not None and max_steps > 0:
            length = trainer_run_length(trainer)
            if length.steps_per_epoch:
                epochs = math.ceil(length.total_steps / length.steps_per_epoch)
        return max(epochs, 1)

    def hard_fraction(self) -> float:
        """Difficulty ``α`` (share of the masked patches chosen as the hardest) for the current epoch."""
        kind, max_fraction = self.difficulty
        return hard_patch_fraction(self.current_epoch, self.planned_epochs(), kind, max_fraction)
