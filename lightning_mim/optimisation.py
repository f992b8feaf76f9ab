"""AdamW, its parameter groups and the warm-up + cosine learning rate, for pre-training and fine-tuning alike.

One definition of a run's length: an epoch is ``ceil(batches / accumulate_grad_batches)`` optimizer
steps (what Lightning steps), the run is ``max_epochs`` such epochs, capped at ``max_steps``, or
``max_steps`` alone. Durations given in epochs (warm-up, an encoder freeze) are converted with that
epoch length whichever way the run's length was given, so a run of ``max_steps = E × epoch`` has the
schedule of the run of ``E`` epochs, with or without gradient accumulation.

Plain PyTorch; :func:`trainer_run_length` is the only place that reads a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_mim.schedules import warmup_cosine

#: Parameters without weight decay besides biases and 1-D tensors (norms): embeddings and learned tokens.
NO_DECAY_KEYWORDS = ("pos_embed", "position_embeddings", "cls_token", "mask_token", "relative_position_bias_table")


def decays(name: str, parameter: nn.Parameter) -> bool:
    """Whether weight decay applies: not to biases, norms and other 1-D tensors, position embeddings or tokens."""
    return not (parameter.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_KEYWORDS))


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    exclude_from_weight_decay: bool = True,
    lr_scale: Callable[[str], float] | None = None,
    is_encoder: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters.

    ``exclude_from_weight_decay``: no decay where :func:`decays` says so (False decays everything,
    as some official scripts do). Without ``lr_scale`` and ``is_encoder`` (pre-training) there are
    two groups: the decaying parameters, then — if any — those without decay. With them
    (fine-tuning: layer-wise LR decay, an encoder freeze) there is one group per (LR scale, weight
    decay, encoder or not), in the order of its first parameter, carrying ``lr_scale`` and
    ``encoder``. Group order is part of a checkpoint's optimizer state, so each layout keeps it.
    """
    def decayed(name: str, parameter: nn.Parameter) -> bool:
        return decays(name, parameter) or not exclude_from_weight_decay

    trainable = [(name, p) for name, p in named_parameters if p.requires_grad]
    if lr_scale is None and is_encoder is None:
        no_decay = [p for name, p in trainable if not decayed(name, p)]
        return [{"params": [p for name, p in trainable if decayed(name, p)], "weight_decay": weight_decay},
                *([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])]
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, parameter in trainable:
        key = (lr_scale(name) if lr_scale else 1.0, weight_decay if decayed(name, parameter) else 0.0,
               bool(is_encoder and is_encoder(name)))
        group = groups.setdefault(key, {"params": [], "weight_decay": key[1], "lr_scale": key[0], "encoder": key[2]})
        group["params"].append(parameter)
    return list(groups.values())


@dataclass(frozen=True)
class RunLength:
    """A run's optimizer steps, and the steps of one epoch (None when the training data has no length)."""

    total_steps: int
    steps_per_epoch: int | None

    def steps(self, epochs: float, name: str) -> int:
        """``epochs`` (fractions allowed) in optimizer steps; ``name`` is the argument, for the error."""
        if epochs < 0:
            raise ValueError(f"{name} must be >= 0, got {epochs}")
        if epochs == 0:
            return 0
        if self.steps_per_epoch is None:
            raise ValueError(f"{name}={epochs} is in epochs, but the training data has no length to make an epoch of; "
                             "give the duration in steps or use data with a length")
        return int(round(epochs * self.steps_per_epoch))


def run_length(max_steps: int | None, max_epochs: int | None, batches_per_epoch: float,
               accumulate_grad_batches: int = 1) -> RunLength:
    """The run's length from the Trainer's settings (``-1`` or None: unset), as Lightning counts steps.

    ``batches_per_epoch`` may be ``inf`` (data without a length): then ``max_steps`` alone sets the length.
    """
    if accumulate_grad_batches < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
    per_epoch = math.ceil(batches_per_epoch / accumulate_grad_batches) if math.isfinite(batches_per_epoch) else None
    total = math.inf
    if per_epoch is not None and max_epochs is not None and max_epochs != -1:
        total = per_epoch * max(max_epochs, 1)
    if max_steps is not None and max_steps != -1:
        total = min(total, max_steps)
    if not math.isfinite(total):
        raise ValueError("the run has no length to lay the learning-rate schedule over: set trainer.max_steps "
                         "(or trainer.max_epochs with training data that has a length)")
    return RunLength(int(total), per_epoch)


def trainer_run_length(trainer: Any) -> RunLength:
    """:func:`run_length` of a Lightning Trainer; sets up its training data first when the epoch length is
    not known yet (``max_steps`` runs: Lightning counts their batches only when the fit loop starts)."""
    if not math.isfinite(trainer.num_training_batches):
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if not math.isfinite(batches) and trainer.limit_train_batches == 0:
        batches = 0  # training is switched off; Lightning leaves the count unset then
    return run_length(trainer.max_steps, trainer.max_epochs, batches, trainer.accumulate_grad_batches)


def adamw_warmup_cosine(
    groups: Sequence[dict[str, Any]],
    length: RunLength,
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    warmup_epochs: float = 0.0,
    warmup_steps: int | None = None,
    warmup_start_lr: float = 0.0,
    min_lr: float = 0.0,
    freeze_encoder_epochs: float = 0.0,
    fused: bool | None = None,
) -> dict[str, Any]:
    """AdamW over ``groups`` with a per-step linear warm-up from ``warmup_start_lr`` to ``lr``, then
    a cosine to ``min_lr`` at the end of the run; Lightning's ``configure_optimizers`` dictionary.

    ``warmup_steps`` wins over ``warmup_epochs`` when given. A group's ``lr_scale`` multiplies its
    learning rate throughout; groups marked ``encoder`` stay at 0 for ``freeze_encoder_epochs``.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    warmup = int(warmup_steps) if warmup_steps is not None else length.steps(warmup_epochs, "warmup_epochs")
    frozen = length.steps(freeze_encoder_epochs, "freeze_encoder_epochs")
    total = length.total_steps
    groups = [{**group, "lr": lr * group["lr_scale"]} if "lr_scale" in group else dict(group) for group in groups]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)

    def factor(step: int) -> float:
        return warmup_cosine(step, total, warmup, 1.0, min_lr / lr, warmup_start_lr / lr)

    def frozen_factor(step: int) -> float:
        return 0.0 if step < frozen else factor(step)

    factors = [frozen_factor if group.get("encoder") and frozen else factor for group in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
