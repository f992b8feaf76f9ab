"""EMA teacher and the momentum / temperature schedules it is driven by."""

import pytest
import torch
from torch import nn

from lightning_mim.schedules import cosine_momentum, teacher_temperature
from lightning_mim.teachers import EMATeacher


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2))
        self.mask_token = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.body(x)


def test_teacher_never_receives_gradient_and_stays_in_eval():
    student = Student()
    teacher = EMATeacher(student, exclude=("mask_token",))
    holder = nn.ModuleDict({"student": student, "teacher": teacher}).train()
    assert not teacher.training and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(6, 4)
    loss = (student(x) - teacher(x)).square().mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    # eval mode: dropout off, so two teacher passes agree
    torch.testing.assert_close(teacher(x), teacher(x))
    holder.train()
    assert not teacher.module.body[1].training


def test_update_moves_exactly_by_the_ema_formula():
    student = Student()
    teacher = EMATeacher(student, exclude=("mask_token",))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.body[2].running_mean.add_(3.0)
    before = {n: p.clone() for n, p in teacher.module.named_parameters()}
    source = {n: p.detach().clone() for n, p in student.named_parameters()}
    m = 0.9
    teacher.update(student, m)
    for name, param in teacher.module.named_parameters():
        if name == "mask_token":
            torch.testing.assert_close(param, before[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(param, m * before[name] + (1 - m) * source[name], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(teacher.module.body[2].running_mean, student.body[2].running_mean)
    teacher.update(student, 1.0)  # m = 1 freezes the teacher
    after = {n: p.clone() for n, p in teacher.module.named_parameters()}
    teacher.update(student, 1.0)
    for name, param in teacher.module.named_parameters():
        assert torch.equal(param, after[name])


def test_cosine_momentum_end_points_and_shape():
    total = 1000
    assert cosine_momentum(0, total) == pytest.approx(0.996)
    assert cosine_momentum(total, total) == pytest.approx(1.0)
    assert cosine_momentum(total // 2, total) == pytest.approx(0.998)
    values = [cosine_momentum(k, total) for k in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(2 * total, total) == pytest.approx(1.0)


def test_teacher_temperature_ramps():
    # SMIT τ1: 0.04 → 0.07, reaching 0.07 on the last ramp epoch (29) with a 29-epoch span
    assert teacher_temperature(0, 29) == pytest.approx(0.04)
    assert teacher_temperature(29, 29) == pytest.approx(0.07)
    assert teacher_temperature(400, 29) == pytest.approx(0.07)
    # SMIT τ2: constant until the delay, then the same ramp
    assert teacher_temperature(29, 29, delay_epochs=30) == pytest.approx(0.04)
    assert teacher_temperature(30, 29, delay_epochs=30) == pytest.approx(0.04)
    assert teacher_temperature(44, 29, delay_epochs=30) == pytest.approx(0.04 + 0.03 * 14 / 29)
    assert teacher_temperature(59, 29, delay_epochs=30) == pytest.approx(0.07)
