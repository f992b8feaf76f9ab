"""Stop (or skip the step) when a training loss is NaN or infinite, before it reaches the weights.

The loss is checked after backward and before the optimizer step, so a bad step can be undone
completely: every gradient is dropped (``grad = None``, which AdamW and SGD skip, momentum and
weight decay included) and the method's post-step hook (the EMA teacher update) is skipped. The
global step and the step-based schedules still advance by one.

``action: stop`` then saves ``last.ckpt`` - the last good weights, with the loop past the bad
batch - and raises :class:`NonFiniteLossError` naming the step, the batch and the offending loss
terms. ``action: skip`` counts the step (logged as ``train/skipped_nonfinite_steps``) and goes on,
until more than ``max_skipped_steps`` were skipped; then it stops as above.

Cost: one device-to-host sync per optimizer step (every micro-batch's finiteness is accumulated
on the device), plus one small all-reduce per step under DDP so that every rank skips or stops
at the same step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_mim.reliability.checkpoint_io import save_last_checkpoint


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss; the message names the step and the terms."""


def _format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{name}={value}" for name, value in terms.items())


class NonFiniteGuard(L.Callback):
    """Checks every training loss for NaN/Inf before the optimizer step.

    The loss terms are named from the module's ``latest_train_losses`` (every pre-training method
    sets it); other modules are reported by their total loss.

    Args:
        action: ``stop`` - save the last good state and stop with an error; ``skip`` - drop the
            step's update and continue.
        max_skipped_steps: with ``skip``, stop once more steps than this were skipped in the run.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped_steps: int = 20) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"action must be 'stop' or 'skip', got {action!r}")
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.action = action
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self._finite: Tensor | None = None
        self._micro_batches: list[tuple[int, dict[str, Tensor]]] = []
        self._bad_step: tuple[int, int, str] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        terms = dict(getattr(pl_module, "latest_train_losses", None) or {})
        terms.setdefault("loss", loss.detach())
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in terms.values()]).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._micro_batches.append((trainer.fit_loop.epoch_loop.batch_idx, {k: v.detach() for k, v in terms.items()}))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        finite, micro_batches = self._finite, self._micro_batches
        self._finite, self._micro_batches = None, []
        bad_here = finite is not None and not bool(finite)
        bad = trainer.strategy.reduce_boolean_decision(bad_here, all=False) if trainer.world_size > 1 else bad_here
        if not bad:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        if hasattr(pl_module, "update_skipped"):
            pl_module.update_skipped = True
        offending = {}
        for batch_index, terms in micro_batches:
            for name, value in terms.items():
                number = float(value.float().mean()) if value.numel() else float("nan")
                if not math.isfinite(number) or not bool(torch.isfinite(value.float()).all()):
                    offending[name] = number
            if offending:
                description = f"batch {batch_index}: {_format_terms(offending)}"
                break
        else:
            description = "another rank's loss"
        self._bad_step = (trainer.global_step, trainer.current_epoch, description)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        bad, self._bad_step = self._bad_step, None
        if bad is not None:
            self.skipped_steps += 1
        pl_module.log("train/skipped_nonfinite_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                      batch_size=1)
        if bad is None:
            return
        step, epoch, description = bad
        message = f"non-finite training loss at global step {step} (epoch {epoch}, {description})"
        if self.action == "skip" and self.skipped_steps <= self.max_skipped_steps:
            rank_zero_warn(f"{message}; optimizer update skipped ({self.skipped_steps} of at most "
                           f"{self.max_skipped_steps} skipped steps)")
            return
        path = save_last_checkpoint(trainer)
        reason = "" if self.action == "stop" else f" after {self.skipped_steps} skipped steps (max_skipped_steps={self.max_skipped_steps})"
        raise NonFiniteLossError(f"{message}; training stopped{reason}. The last good state (the update of this step "
                                 f"was not applied) is saved in {path}")
