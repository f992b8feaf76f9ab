"""The shared optimiser builder: run length, parameter groups, warm-up + cosine, encoder freeze."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from lightning_mim.optimisation import (
    RunLength,
    adamw_warmup_cosine,
    parameter_groups,
    run_length,
    trainer_run_length,
)


class TokenNet(nn.Module):
    """A token and a position embedding registered before the weights (as in a ViT), a norm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(3, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def lrs(config: dict, steps: int) -> list[list[float]]:
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_an_epoch_is_the_optimizer_steps_lightning_takes_with_accumulation():
    assert run_length(max_steps=-1, max_epochs=4, batches_per_epoch=10, accumulate_grad_batches=3) == RunLength(16, 4)
    assert run_length(max_steps=16, max_epochs=-1, batches_per_epoch=10, accumulate_grad_batches=3) == RunLength(16, 4)
    assert run_length(max_steps=5, max_epochs=4, batches_per_epoch=10) == RunLength(5, 10)  # max_steps caps the run
    assert run_length(max_steps=100, max_epochs=-1, batches_per_epoch=math.inf) == RunLength(100, None)


def test_a_run_without_a_length_or_an_epoch_is_refused_with_the_setting_to_change():
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        run_length(max_steps=-1, max_epochs=10, batches_per_epoch=math.inf)
    with pytest.raises(ValueError, match="warmup_epochs=2 is in epochs.*give the duration in steps"):
        RunLength(100, None).steps(2, "warmup_epochs")
    assert RunLength(100, None).steps(0, "warmup_epochs") == 0
    assert RunLength(100, 8).steps(1.5, "warmup_epochs") == 12


def test_max_steps_and_the_equivalent_epochs_give_the_same_schedule_with_accumulation():
    """10 batches, accumulation 3 → 4 steps an epoch: 4 epochs = 16 steps, warm-up 1.5 epochs = 6 steps."""
    by_epochs = run_length(max_steps=-1, max_epochs=4, batches_per_epoch=10, accumulate_grad_batches=3)
    by_steps = run_length(max_steps=16, max_epochs=-1, batches_per_epoch=10, accumulate_grad_batches=3)
    schedules = []
    for length in (by_epochs, by_steps):
        torch.manual_seed(0)
        net = TokenNet()
        config = adamw_warmup_cosine(parameter_groups(net.named_parameters(), 0.05), length, lr=1e-3,
                                     warmup_epochs=1.5, min_lr=1e-5)
        schedules.append([group[0] for group in lrs(config, 17)])
    assert schedules[0] == schedules[1]
    first = schedules[0]
    assert first[0] == 0.0 and first[3] == pytest.approx(0.5e-3) and first[6] == pytest.approx(1e-3)
    assert first[16] == pytest.approx(1e-5) and all(a >= b for a, b in zip(first[6:], first[7:]))


def test_trainer_run_length_reads_a_real_trainer_as_lightning_steps(tmp_path):
    """A ``max_steps`` run learns its epoch length too; both agree with the steps Lightning takes."""
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 1)
            self.lengths: list[RunLength] = []
            self.steps_taken = 0

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def on_before_optimizer_step(self, optimizer) -> None:
            self.steps_taken += 1

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(10, 2), batch_size=1)

        def configure_optimizers(self):
            self.lengths.append(trainer_run_length(self.trainer))
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for limits in (dict(max_epochs=2), dict(max_steps=8, max_epochs=-1)):
        module = Tiny()
        trainer = L.Trainer(accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **limits)
        trainer.fit(module)
        assert module.lengths == [RunLength(8, 4)], limits
        assert module.steps_taken == 8


def test_no_weight_decay_for_biases_norms_embeddings_and_tokens_and_the_decaying_group_first():
    net = TokenNet()
    decay, no_decay = parameter_groups(net.named_parameters(), weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net.proj.weight), id(net.head.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (net.cls_token, net.pos_embed, net.proj.bias,
                                                                  net.norm.weight, net.norm.bias, net.head.bias)}
    (everything,) = parameter_groups(net.named_parameters(), weight_decay=0.05, exclude_from_weight_decay=False)
    assert len(everything["params"]) == 8  # the frozen layer is left out


def test_layered_groups_scale_the_lr_and_freeze_the_encoder():
    net = TokenNet()
    scale = {"cls_token": 0.25, "pos_embed": 0.25, "proj": 0.5}
    groups = parameter_groups(net.named_parameters(), weight_decay=0.05,
                              lr_scale=lambda name: scale.get(name.split(".")[0], 1.0),
                              is_encoder=lambda name: name.split(".")[0] in scale)
    # one group per (scale, decay, encoder), in the order of its first parameter
    assert [(g["lr_scale"], g["weight_decay"], g["encoder"]) for g in groups] == [
        (0.25, 0.0, True), (0.5, 0.05, True), (0.5, 0.0, True), (1.0, 0.0, False), (1.0, 0.05, False)]
    config = adamw_warmup_cosine(groups, RunLength(20, 4), lr=1e-2, warmup_steps=0, freeze_encoder_epochs=1.0)
    seen = lrs(config, 6)
    for step, row in enumerate(seen):
        encoder_lrs, other_lrs = row[:3], row[3:]
        if step < 4:
            assert encoder_lrs == [0.0, 0.0, 0.0], step
        else:
            assert encoder_lrs == pytest.approx([0.25 * other_lrs[0], 0.5 * other_lrs[0], 0.5 * other_lrs[0]])
        assert other_lrs[0] == other_lrs[1] > 0


def test_warmup_steps_win_over_warmup_epochs_and_lr_must_be_positive():
    net = TokenNet()
    config = adamw_warmup_cosine(parameter_groups(net.named_parameters(), 0.0), RunLength(100, 50), lr=1.0,
                                 warmup_epochs=1, warmup_steps=10, warmup_start_lr=0.1)
    factor = config["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [factor(s) for s in (0, 5, 10, 55, 100)] == pytest.approx([0.1, 0.55, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="lr must be > 0"):
        adamw_warmup_cosine(parameter_groups(net.named_parameters(), 0.0), RunLength(10, 1), lr=0.0)
