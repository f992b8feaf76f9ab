"""EMA teacher shared by every teacher/student method (made and updated by the methods' teacher–student base)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of ``student`` updated as ``θ_T ← m·θ_T + (1 − m)·θ_S`` after optimizer steps.

    The copy never requires gradients and stays in eval mode (no dropout / drop-path in targets)
    even when the surrounding LightningModule is put into train mode. Parameters are matched by
    name, so a student may own extra parameters (e.g. SMIT's mask token) the teacher ignores via
    ``exclude``; buffers are copied.
    """

    def __init__(self, student: nn.Module, exclude: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        self.exclude = tuple(exclude)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module):
        student_params = dict(student.named_parameters())
        teacher, source = [], []
        for name, param in self.module.named_parameters():
            if any(name.startswith(prefix) for prefix in self.exclude) or name not in student_params:
                continue
            teacher.append(param)
            source.append(student_params[name].detach())
        return teacher, source

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """One EMA step with momentum ``m``; buffers (e.g. norm statistics) are copied."""
        teacher, source = self._pairs(student)
        if teacher:
            torch._foreach_lerp_(teacher, source, 1.0 - momentum)  # θ_T + (1 − m)(θ_S − θ_T): one pass
        student_buffers = dict(student.named_buffers())
        for name, buf in self.module.named_buffers():
            if name in student_buffers:
                buf.copy_(student_buffers[name])
