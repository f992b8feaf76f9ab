"""The base class every pre-training method derives from.

It owns what methods share: AdamW with parameter groups and linear warm-up + cosine LR over the
run's optimizer steps (:mod:`lightning_mim.optimisation`, shared with fine-tuning), logging of every
loss term, image-panel capture, the post-optimizer-step hook teachers use, and the epoch hand-off to
the data module's subject sampler. A method only
implements :meth:`MIMModule.shared_step` (and :meth:`MIMModule.export_encoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_mim.optimisation import adamw_warmup_cosine, parameter_groups, trainer_run_length


@dataclass
class StepOutput:
    """What a method's step returns.

    ``losses`` holds every term and ``"loss"`` (the total that is back-propagated); ``visuals`` holds
    ``B, C, D, H, W`` volumes for the tri-planar panel (names starting with ``heat/`` are rendered as
    heat-map overlays); ``scalars`` holds extra values to log (momentum, temperatures, fractions).
    """

    losses: dict[str, Tensor]
    visuals: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float | Tensor] = field(default_factory=dict)


@dataclass
class ExportedEncoder:
    """An encoder in the key layout of its target segmentation network, ready to be saved.

    What :meth:`MIMModule.export_encoder` returns; the ``EncoderExport`` callback
    (:mod:`lightning_mim.callbacks.export`) saves it at the end of pre-training.
    """

    target: str
    state_dict: dict[str, Tensor]
    network_kwargs: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


class MIMModule(L.LightningModule):
    """Base of all pre-training methods.

    Args:
        lr: peak learning rate (absolute; recipes state how it was scaled from the batch size).
        weight_decay: AdamW weight decay for weight matrices and kernels.
        betas: AdamW betas.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        warmup_steps: linear warm-up length in optimizer steps; overrides ``warmup_epochs`` when set
            (step-based recipes such as Swin UNETR SSL / HybridMIM: 500 steps).
        warmup_start_lr: learning rate at step 0 of the warm-up.
        min_lr: learning rate reached at the end of the cosine decay.
        exclude_from_weight_decay: no decay for biases, norms, position embeddings and tokens
            (False reproduces official scripts that decay everything).
        fused_optimizer: AdamW's fused kernel (same update; on CPU the optimizer step is 3–4× faster,
            a quarter of a ViT-B step). Not used with 16-bit GradScaler precision plus gradient
            clipping, which Lightning cannot combine with fused optimizers.
        compile_networks: ``torch.compile`` every sub-network in place in ``configure_model``
            (``nn.Module.compile``: state-dict keys unchanged). GPU option: the first steps pay the
            compilation (~30 s or more).
    """

    def __init__(
        self,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 10.0,
        warmup_steps: int | None = None,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
        exclude_from_weight_decay: bool = True,
        fused_optimizer: bool = True,
        compile_networks: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._networks_compiled = False
        # Set by the panel callback on the steps it logs: methods build their visuals only then.
        self.capture_visuals = False
        self.latest_visuals: dict[str, Tensor] = {}
        # Read by the NaN guard (lightning_mim.reliability) to name offending terms; it sets
        # update_skipped when it dropped a step's update, so the teacher is not updated either.
        self.latest_train_losses: dict[str, Tensor] = {}
        self.update_skipped = False

    # ------------------------------------------------------------------ to implement
    def shared_step(self, batch: dict[str, Any]) -> StepOutput:
        raise NotImplementedError

    def export_encoder(self) -> ExportedEncoder:
        raise NotImplementedError(f"{type(self).__name__} does not export an encoder")

    def after_optimizer_step(self) -> None:
        """Called after every real optimizer step (once per accumulation cycle): EMA updates go here."""

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """Spatial size the networks were built for; checked against the data before training."""
        return None

    def step_generator(self, seed: int) -> torch.Generator:
        """Randomness of this step's corruption or views: a function of (seed, global step, rank, stage) only.

        A resumed or re-run step draws what the original drew, whatever ran before it in the process;
        ranks and the validation stage draw their own streams.
        """
        rank = self.global_rank if self._trainer is not None else 0
        stage = 0 if self.training else 1
        return torch.Generator().manual_seed(seed * 1_000_003 + self.global_step * 7919 + rank * 104_729 + stage)

    # ------------------------------------------------------------------ steps
    def _run(self, batch: dict[str, Any], stage: str) -> StepOutput:
        out = self.shared_step(batch)
        batch_size = int(batch["image"].shape[0])
        on_step = stage == "train"
        if on_step:
            self.latest_train_losses = {name: value.detach() for name, value in out.losses.items()}
        for name, value in out.losses.items():
            self.log(f"{stage}/{name}", value.detach().float(), on_step=on_step, on_epoch=True,
                     prog_bar=name == "loss", batch_size=batch_size, sync_dist=not on_step)
        for name, value in out.scalars.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.log(f"{stage}/{name}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                     sync_dist=not on_step)
        if self.capture_visuals and out.visuals:
            self.latest_visuals = {k: v[:1].detach().float().cpu() for k, v in out.visuals.items()}
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._run(batch, "train").losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._run(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._run(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        self.capture_visuals = True
        out = self.shared_step(batch)
        return {"case_id": batch.get("case_id"), **{k: v.detach().cpu() for k, v in out.visuals.items()}}

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_size = getattr(datamodule, "model_input_size", None)
        if self.input_size is not None and data_size is not None and tuple(data_size) != tuple(self.input_size):
            raise ValueError(
                f"{type(self).__name__} was built for inputs of {tuple(self.input_size)} voxels but the data module "
                f"delivers {tuple(data_size)}; set the model's img_size to the data's patch/view size"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.update_skipped:  # the NaN guard dropped this step's gradients
            self.update_skipped = False
            return
        self.after_optimizer_step()

    def networks(self) -> dict[str, nn.Module]:
        """The networks a step runs, trained ones and EMA teachers: every child module that has parameters.

        The one view of a method's networks that tools share: ``compile_networks`` compiles each, and the
        benchmarks time their forward and backward apart from the method's masking and bookkeeping.
        """
        return {name: child for name, child in self.named_children() if next(child.parameters(), None) is not None}

    def configure_model(self) -> None:
        """With ``compile_networks``, compile each of :meth:`networks` (once)."""
        if self.hparams.get("compile_networks") and not self._networks_compiled:
            for network in self.networks().values():
                network.compile()
            self._networks_compiled = True

    # ------------------------------------------------------------------ optimisation
    def _use_fused_optimizer(self) -> bool:
        if not self.hparams.get("fused_optimizer", True):
            return False
        trainer = self._trainer
        scaled = str(getattr(trainer, "precision", "")).startswith("16")
        return not (scaled and getattr(trainer, "gradient_clip_val", None))

    def parameter_groups(self) -> list[dict[str, Any]]:
        return parameter_groups(self.named_parameters(), self.hparams.weight_decay,
                                self.hparams.exclude_from_weight_decay)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.parameter_groups(), trainer_run_length(self.trainer), hp.lr, hp.betas,
                                   warmup_epochs=hp.warmup_epochs, warmup_steps=hp.get("warmup_steps"),
                                   warmup_start_lr=hp.warmup_start_lr, min_lr=hp.min_lr,
                                   fused=self._use_fused_optimizer())
