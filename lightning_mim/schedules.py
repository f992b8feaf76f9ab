"""Schedules as pure functions of the global step or epoch.

Never index a schedule by the step inside the current epoch (SMIT's momentum bug, methods.md §3.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


def warmup_cosine(step: float, total: float, warmup: float, start: float = 1.0, end: float = 0.0, warmup_from: float = 0.0) -> float:
    """Linear warm-up from ``warmup_from`` to ``start`` over ``warmup`` steps, then cosine to ``end`` at ``total``."""
    if total <= 0:
        return start
    if warmup > 0 and step < warmup:
        return warmup_from + (start - warmup_from) * step / warmup
    span = max(total - warmup, 1e-12)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """DINO/iBOT/SMIT teacher momentum ``m(k) = 1 - (1 - m0)(cos(πk/K) + 1)/2`` (to ``final``)."""
    if total_steps <= 0:
        return final
    progress = min(max(step / total_steps, 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def linear_ramp(x: float, x_end: float, start: float, end: float) -> float:
    """``start`` at ``x = 0`` rising linearly to ``end`` at ``x_end``, then constant."""
    if x_end <= 0 or x >= x_end:
        return end
    return start + (end - start) * max(x, 0.0) / x_end


def ema_momentum_ramp(epoch: float, ramp_epochs: float, start: float = 0.999, end: float = 0.9999) -> float:
    """HPM / AnatoMask EMA decay: linear ``0.999 → 0.9999`` over the first ``ramp_epochs`` epochs."""
    return linear_ramp(epoch, ramp_epochs, start, end)


DifficultyKind = Literal["easy_to_hard", "anatomask", "hard_to_easy", "constant"]


def hard_patch_fraction(epoch: int, max_epochs: int, kind: DifficultyKind = "easy_to_hard", max_fraction: float = 0.5) -> float:
    """Fraction α of the masked patches chosen as the hardest ones, at epoch ``epoch`` of ``max_epochs``.

    * ``easy_to_hard`` (HPM/SelfMedHPM): ``α = r_max·(e+1)/E``.
    * ``anatomask`` (AnatoMask code): ``α = r_max·(e+1)/(E-1)``, capped at ``r_max``.
    * ``hard_to_easy`` (AnatoMask's commented alternative): ``α = r_max − r_max·e/E``.
    * ``constant``: ``α = r_max``.
    """
    e, big_e = float(epoch), float(max(max_epochs, 1))
    if kind == "easy_to_hard":
        value = max_fraction * (e + 1.0) / big_e
    elif kind == "anatomask":
        value = max_fraction * (e + 1.0) / max(big_e - 1.0, 1.0)
    elif kind == "hard_to_easy":
        value = max_fraction - max_fraction * e / big_e
    elif kind == "constant":
        value = max_fraction
    else:
        raise ValueError(f"unknown difficulty schedule {kind!r}")
    return float(min(max(value, 0.0), max_fraction))


def teacher_temperature(epoch: float, warmup_epochs: float, start: float = 0.04, end: float = 0.07, delay_epochs: float = 0.0) -> float:
    """Teacher temperature: ``start`` until ``delay_epochs``, linear to ``end`` over ``warmup_epochs``."""
    return linear_ramp(epoch - delay_epochs, warmup_epochs, start, end) if epoch >= delay_epochs else start


def epochs_in(value: float, unit: Literal["epochs", "fraction"], max_epochs: int) -> float:
    """A duration given in epochs or as a fraction of the run, in epochs.

    HPM ramps its EMA over a fixed 100 epochs, AnatoMask over a quarter of the run (``0.25``, fraction).
    """
    if value < 0:
        raise ValueError(f"a duration cannot be negative, got {value}")
    if unit == "epochs":
        return float(value)
    if unit == "fraction":
        return float(value) * float(max(max_epochs, 1))
    raise ValueError(f"unit must be 'epochs' or 'fraction', got {unit!r}")


@dataclass(frozen=True)
class MomentumSchedule:
    """Teacher EMA momentum over a run, read with :meth:`at`.

    * ``cosine_per_step`` (DINO/iBOT/SMIT/DINOv2): :func:`cosine_momentum` of the global optimizer step
      over the run's steps, ``start → end``.
    * ``ramp_per_epoch`` (HPM/AnatoMask): :func:`ema_momentum_ramp` of the epoch, ``start → end`` over
      ``ramp`` (epochs, or a fraction of the run with ``ramp_unit="fraction"``), then constant.
    * ``constant`` (VoCo): ``start`` throughout.
    """

    kind: Literal["cosine_per_step", "ramp_per_epoch", "constant"]
    start: float
    end: float
    ramp: float = 0.0
    ramp_unit: Literal["epochs", "fraction"] = "epochs"

    @property
    def per_step(self) -> bool:
        """Whether :meth:`at` takes (global step, total steps) rather than (epoch, planned epochs)."""
        return self.kind == "cosine_per_step"

    def at(self, position: int, length: int) -> float:
        """Momentum at step ``position`` of ``length`` steps, or epoch ``position`` of ``length`` (see :attr:`per_step`)."""
        if self.kind == "cosine_per_step":
            return cosine_momentum(position, length, self.start, self.end)
        if self.kind == "ramp_per_epoch":
            return ema_momentum_ramp(position, epochs_in(self.ramp, self.ramp_unit, length), self.start, self.end)
        if self.kind == "constant":
            return self.start
        raise ValueError(f"unknown momentum schedule {self.kind!r}")
