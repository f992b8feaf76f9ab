"""Per-epoch schedules shared by the methods whose mask a teacher chooses (SelfMedHPM, AnatoMask)."""

from __future__ import annotations

from lightning_mim.schedules import ema_momentum_ramp, epochs_in, hard_patch_fraction


class GuidedMaskingSchedules:
    """Mixin for a :class:`~lightning_mim.methods.base.MIMModule` whose hyper-parameters include
    ``difficulty_schedule``, ``max_hard_fraction``, ``ema_ramp``, ``ema_ramp_unit``,
    ``ema_momentum_start`` and ``ema_momentum_end``.

    Both schedules are indexed by the current epoch of the planned run, never by the step inside the
    epoch. Without a trainer (unit tests) the module behaves as epoch 0 of a 1-epoch run.
    """

    def planned_epochs(self) -> int:
        max_epochs = getattr(self._trainer, "max_epochs", None)
        return int(max_epochs) if max_epochs and max_epochs > 0 else 1

    def hard_fraction(self) -> float:
        """Difficulty ``α`` (share of the masked patches chosen as the hardest) for the current epoch."""
        hp = self.hparams
        return hard_patch_fraction(self.current_epoch, self.planned_epochs(), hp.difficulty_schedule, hp.max_hard_fraction)

    def ema_momentum(self) -> float:
        """Teacher decay for the current epoch: linear ramp over ``E_r`` epochs, then constant."""
        hp = self.hparams
        ramp = epochs_in(hp.ema_ramp, hp.ema_ramp_unit, self.planned_epochs())
        return ema_momentum_ramp(self.current_epoch, ramp, hp.ema_momentum_start, hp.ema_momentum_end)
