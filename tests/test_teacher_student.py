"""The teacher–student base: EMA wiring, momentum schedules, the NaN guard's skip, the shared argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_mim.methods.anatomask import AnatoMask
from lightning_mim.methods.dinov2 import DINOv2
from lightning_mim.methods.selfmedhpm import SelfMedHPM
from lightning_mim.methods.smit import SMIT
from lightning_mim.methods.teacher_student import (
    TeacherStudentModule,
    constant_momentum,
    cosine_momentum_per_step,
    momentum_ramp_per_epoch,
)
from lightning_mim.methods.voco import VoCo
from lightning_mim.schedules import MomentumSchedule


class LinearTeacherStudent(TeacherStudentModule):
    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__(fused_optimizer=False)
        self.student = nn.Linear(3, 2)
        self.init_teacher(self.student, constant_momentum(momentum))


def sgd_step(model: LinearTeacherStudent, optimizer: torch.optim.Optimizer) -> None:
    def closure():
        optimizer.zero_grad()
        loss = model.student(torch.ones(4, 3)).square().sum()
        loss.backward()
        return loss

    model.optimizer_step(0, 0, optimizer, closure)


def test_a_dropped_update_leaves_the_teacher_unchanged_and_the_next_step_updates_it():
    torch.manual_seed(0)
    model = LinearTeacherStudent(momentum=0.9)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.1)
    teacher_before = [p.clone() for p in model.teacher.parameters()]

    model.update_skipped = True  # what the NaN guard sets when it drops a step's gradients
    sgd_step(model, optimizer)
    assert not model.update_skipped  # the skip covers this one step only
    assert not torch.equal(model.student.weight, teacher_before[0])  # the student moved (gradients were kept here) …
    for before, after in zip(teacher_before, model.teacher.parameters()):
        assert torch.equal(before, after)  # … the teacher did not follow

    sgd_step(model, optimizer)
    for before, after, student in zip(teacher_before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * student.detach())


def test_the_student_is_followed_but_not_saved_twice():
    model = LinearTeacherStudent()
    assert sorted(model.state_dict()) == ["student.bias", "student.weight", "teacher.module.bias",
                                          "teacher.module.weight"]
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_momentum_schedules():
    cosine = MomentumSchedule("cosine_per_step", 0.996, 1.0)
    assert cosine.per_step
    assert cosine.at(0, 100) == pytest.approx(0.996)
    assert cosine.at(50, 100) == pytest.approx(0.998)
    assert cosine.at(100, 100) == pytest.approx(1.0)
    ramp = MomentumSchedule("ramp_per_epoch", 0.999, 0.9999, 0.25, "fraction")
    assert not ramp.per_step
    assert ramp.at(0, 1000) == pytest.approx(0.999)
    assert ramp.at(125, 1000) == pytest.approx(0.99945)  # half-way through a ramp of 250 epochs
    assert ramp.at(900, 1000) == pytest.approx(0.9999)
    assert MomentumSchedule("ramp_per_epoch", 0.999, 0.9999, 100, "epochs").at(50, 800) == pytest.approx(0.99945)
    assert MomentumSchedule("constant", 0.9, 0.9).at(7, 10) == 0.9


def test_teacher_momentum_reads_the_step_or_the_epoch_of_the_run():
    model = LinearTeacherStudent()
    model.momentum_schedule = MomentumSchedule("ramp_per_epoch", 0.5, 1.0, 10, "epochs")
    model._trainer = SimpleNamespace(max_epochs=20, current_epoch=5)
    assert model.teacher_momentum() == pytest.approx(0.75)
    model.momentum_schedule = MomentumSchedule("cosine_per_step", 0.0, 1.0)
    model._trainer = SimpleNamespace(max_epochs=20, current_epoch=5, global_step=50, estimated_stepping_batches=100)
    assert model.teacher_momentum() == pytest.approx(0.5)


def test_guided_masking_difficulty_follows_the_epoch():
    model = LinearTeacherStudent()
    model.init_guided_masking("easy_to_hard", 0.5)
    model._trainer = SimpleNamespace(max_epochs=100, current_epoch=49)
    assert model.hard_fraction() == pytest.approx(0.25)


@pytest.mark.parametrize("make, argument", [
    (lambda: cosine_momentum_per_step(0.999, 0.99), "momentum_start ≤ momentum_end"),
    (lambda: cosine_momentum_per_step(0.9, 1.5), "momentum_end"),
    (lambda: momentum_ramp_per_epoch(1.2, 0.9999, 0.1, "fraction"), "ema_momentum_start must be in"),
    (lambda: momentum_ramp_per_epoch(0.999, -0.1, 0.1, "fraction"), "ema_momentum_end must be in"),
    (lambda: momentum_ramp_per_epoch(0.999, 0.9999, -1, "fraction"), "ema_ramp must be >= 0"),
    (lambda: momentum_ramp_per_epoch(0.999, 0.9999, 0.1, "steps"), "ema_ramp_unit must be"),
    (lambda: constant_momentum(1.1), "teacher_momentum must be in"),
    (lambda: LinearTeacherStudent().init_guided_masking("hardest", 0.5), "difficulty_schedule must be one of"),
    (lambda: LinearTeacherStudent().init_guided_masking("constant", 1.5), "max_hard_fraction must be in"),
])
def test_shared_arguments_are_checked_with_one_line_errors_naming_them(make, argument):
    with pytest.raises(ValueError, match=argument) as error:
        make()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method, arguments, named", [
    (SMIT, {"momentum_start": 1.2}, "momentum_start"),
    (DINOv2, {"momentum_end": 0.5}, "momentum_end"),
    (AnatoMask, {"ema_momentum_end": 2.0}, "ema_momentum_end"),
    (SelfMedHPM, {"img_size": 32, "embed_dim": 48, "depth": 1, "num_heads": 4, "decoder_dim": 24, "decoder_depth": 1,
                  "decoder_heads": 2, "ema_ramp_unit": "steps"}, "ema_ramp_unit"),
    (VoCo, {"teacher_momentum": -0.5}, "teacher_momentum"),
])
def test_every_teacher_method_checks_its_momentum_arguments(method, arguments, named):
    assert issubclass(method, TeacherStudentModule)
    with pytest.raises(ValueError, match=named):
        method(**arguments)
