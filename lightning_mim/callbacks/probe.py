"""Online segmentation probe: during pre-training, how well do the frozen encoder's features segment?

Every ``every_n_steps`` optimizer steps (and once before the first, as the random-initialisation
baseline), rank 0:

1. asks the method for its encoder (``export_encoder``, the file fine-tuning would load) and loads
   it into the method's target segmentation network, built once (:mod:`lightning_mim.segmentation`);
2. runs that network's encoder (:mod:`lightning_mim.segmentation.features`) on fixed crops of a few
   labelled cases, without gradients, and resamples every feature map to one grid
   (``ROI / feature_stride``);
3. fits a small head (a linear layer, or one hidden layer) on the fit cases' features with
   cross-entropy + soft Dice against the labels' class fractions on that grid;
4. predicts the eval cases' crops (logits interpolated back to voxels) and logs the Dice of every
   organ present in them, pooled over the crops, and their mean: ``probe/dice/<organ>``,
   ``probe/dice_mean``, plus ``probe/seconds`` and ``probe/cost_fraction`` (probe time over
   training time so far), to the console and to the run's loggers (W&B).

The crops are drawn once, from the probe's own generator, centred on the organs in turn, so every
probe of a run sees the same voxels and the numbers are comparable across steps.

The training run is not changed by it: the probe works on a copy of the encoder (no gradient and
no mode change reach the method), with autocast off and under ``isolate_rng`` (every global random
generator is restored), and it draws its own randomness from a private ``torch.Generator``. A run
with the probe gives the same losses as one without it, and resumes exactly.

Labelled data: any source :class:`~data_modules.segmentation.SegmentationDataModule` reads
(``data={"datalist": ...}``, ``{"folder": ...}``, ``{"csv": ...}``, plus any of its other
arguments); by default its embedded phantom cohort. Unless given in ``data``, the preprocessing,
cache folder, channels and phantom settings are those of the pre-training data module, and the crop
size is the method's input size. The fit cases are the data module's labelled training subset
(``num_labelled = fit_cases``), the eval cases the first ``eval_cases`` of its validation split.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

#: Settings of the pre-training data module the probe's labelled data inherits unless ``data`` sets them.
INHERITED_DATA_SETTINGS = ("preprocessing", "cache_dir", "in_channels", "phantom_root", "phantom_cases", "phantom_shape",
                           "phantom_seed")


# --------------------------------------------------------------------------- crops
def organ_centred_crops(image: Tensor, label: Tensor, roi: tuple[int, int, int], count: int, generator: torch.Generator,
                        first_class: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``count`` (image ``C×roi``, label ``roi``) crops of one case, each centred on a voxel of an organ.

    The organs present take turns (starting at ``first_class`` in their sorted order), so small
    organs get crops too; the voxel within the organ comes from ``generator``. Cases without any
    foreground get uniformly placed crops. Crops are shifted inside the volume, never padded.
    """
    shape = tuple(label.shape)
    if any(s < r for s, r in zip(shape, roi)):
        raise ValueError(f"a labelled case of shape {shape} is smaller than the probe's crop {roi}")
    organs = [int(c) for c in torch.unique(label).tolist() if c != 0]
    crops = []
    for index in range(count):
        if organs:
            organ = organs[(first_class + index) % len(organs)]
            voxels = torch.nonzero(label == organ)
            centre = voxels[int(torch.randint(len(voxels), (), generator=generator))].tolist()
        else:
            centre = [int(torch.randint(s, (), generator=generator)) for s in shape]
        start = [min(max(c - r // 2, 0), s - r) for c, r, s in zip(centre, roi, shape)]
        window = tuple(slice(a, a + r) for a, r in zip(start, roi))
        crops.append((image[(slice(None), *window)].clone(), label[window].clone()))
    return crops


# --------------------------------------------------------------------------- the head
class ProbeHead(nn.Module):
    """Per-voxel classifier on standardised features (``… × C`` rows): linear, or one hidden layer of ``hidden`` units."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden:
            self.layers = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.layers = nn.Linear(in_channels, num_classes)

    def reset(self, generator: torch.Generator) -> None:
        """Deterministic initialisation from ``generator`` (never the global stream); the output layer starts at 0."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear in linears[:-1]:
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.copy_(torch.rand(linear.weight.shape, generator=generator) * 2 * bound - bound)
                linear.bias.zero_()
            linears[-1].weight.zero_()
            linears[-1].bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def voxel_rows(volumes: Tensor) -> Tensor:
    """``N×C×D×H×W`` → ``(N·D·H·W)×C``: one row per voxel, the layout the head works on."""
    return volumes.permute(0, 2, 3, 4, 1).reshape(-1, volumes.shape[1])


def soft_targets(labels: Tensor, num_classes: int, grid: tuple[int, int, int]) -> Tensor:
    """Class fractions of ``N×D×H×W`` label maps on ``grid`` (``N×K×grid``): each cell's share of every class."""
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    return F.adaptive_avg_pool3d(one_hot, grid)


def fit_head(features: Tensor, targets: Tensor, hidden: int, steps: int, lr: float, generator: torch.Generator) -> ProbeHead:
    """A :class:`ProbeHead` fitted full-batch with Adam on cross-entropy + soft Dice (background excluded).

    ``features`` are ``V×C`` rows, ``targets`` the ``V×K`` class fractions of the same voxels.
    """
    head = ProbeHead(features.shape[1], targets.shape[1], hidden).to(features.device)
    head.reset(generator)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        logits = head(features)
        probabilities = logits.softmax(dim=1)
        overlap = (probabilities * targets).sum(0)[1:]
        sizes = (probabilities + targets).sum(0)[1:]
        dice_loss = 1.0 - ((2 * overlap + 1e-5) / (sizes + 1e-5)).mean()
        loss = F.cross_entropy(logits, targets) + dice_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head.eval()


def pooled_dice(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Dice of classes 1..K−1 over all crops together (NaN for a class absent from the labels)."""
    from lightning_mim.segmentation.evaluation import case_metrics

    return case_metrics(predictions.reshape(-1, *predictions.shape[2:]).cpu(),
                        labels.reshape(-1, *labels.shape[2:]).cpu(), num_classes, hd95=False)["dice"]


# --------------------------------------------------------------------------- the callback
class SegmentationProbe(L.Callback):
    """Fits a small head on frozen encoder features every ``every_n_steps`` steps and logs per-organ Dice.

    See the module docstring for what it does and why it leaves the training run unchanged.

    Args:
        every_n_steps: probe after every this many optimizer steps.
        at_start: also probe the initial encoder before the first step (the baseline every later
            probe is compared with; not repeated when a run resumes).
        fit_cases: labelled cases the head is fitted on.
        eval_cases: held-out cases the Dice is measured on (fewer if the validation split is smaller).
        crops_per_case: crops of the method's input size cut from each case.
        feature_stride: the feature grid is the crop size divided by this (finer scales are
            average-pooled to it, coarser ones interpolated); the head is trained on that grid.
        head_hidden: hidden units of the head; 0 = a linear probe.
        head_steps: full-batch Adam steps per fit.
        head_lr: Adam learning rate of the head.
        seed: crops and head initialisation (a private generator).
        data: arguments of :class:`~data_modules.segmentation.SegmentationDataModule` for the
            labelled cases, e.g. ``{"datalist": "dataset.json"}``; None = the phantom cohort.
        max_cost_fraction: warn (once) when probing has taken more than this share of the
            training time; raise ``every_n_steps`` or lower the sizes then.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        at_start: bool = True,
        fit_cases: int = 2,
        eval_cases: int = 2,
        crops_per_case: int = 4,
        feature_stride: int = 4,
        head_hidden: int = 0,
        head_steps: int = 100,
        head_lr: float = 0.02,
        seed: int = 0,
        data: dict[str, Any] | None = None,
        max_cost_fraction: float = 0.1,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("fit_cases", fit_cases), ("eval_cases", eval_cases),
                            ("crops_per_case", crops_per_case), ("feature_stride", feature_stride),
                            ("head_steps", head_steps)):
            if value < 1:
                raise ValueError(f"SegmentationProbe: {name} must be >= 1, got {value}")
        if head_hidden < 0 or head_lr <= 0 or max_cost_fraction <= 0:
            raise ValueError("SegmentationProbe: head_hidden must be >= 0, head_lr and max_cost_fraction > 0")
        from data_modules.segmentation import SegmentationDataModule

        unknown = sorted(set(data or {}) - SegmentationDataModule.argument_names())
        if unknown:
            raise ValueError(f"SegmentationProbe: data has unknown keys {unknown}; use arguments of "
                             f"data_modules.segmentation.SegmentationDataModule (datalist, folder, csv, ...)")
        fixed = sorted({"patch_size", "num_labelled"} & set(data or {}))
        if fixed:
            raise ValueError(f"SegmentationProbe: data.{fixed[0]} is set by the probe (crop = the method's input size, "
                             f"num_labelled = fit_cases); remove it")
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.fit_cases, self.eval_cases, self.crops_per_case = fit_cases, eval_cases, crops_per_case
        self.feature_stride, self.head_hidden = feature_stride, head_hidden
        self.head_steps, self.head_lr, self.seed = head_steps, head_lr, seed
        self.data = dict(data or {})
        self.max_cost_fraction = max_cost_fraction
        self.class_names: list[str] = []
        self.history: list[dict[str, float]] = []
        self._network: nn.Module | None = None
        self._target = ""
        self._crops: dict[str, tuple[Tensor, Tensor]] = {}
        self._last_step = -1
        self._probe_seconds = 0.0
        self._train_start = 0.0
        self._warned_cost = False

    # ------------------------------------------------------------------ set-up
    def data_module(self, trainer: L.Trainer, roi: tuple[int, int, int]):
        """The labelled data module (not yet set up) the probe reads."""
        from data_modules.segmentation import SegmentationDataModule

        pretraining = getattr(trainer, "datamodule", None)
        inherited = {name: getattr(pretraining, name) for name in INHERITED_DATA_SETTINGS
                     if name not in self.data and getattr(pretraining, name, None) is not None}
        arguments = {"num_workers": 0, "augmentation": None, "seed": self.seed, **inherited, **self.data,
                     "patch_size": roi, "num_labelled": self.fit_cases}
        return SegmentationDataModule(**arguments)

    def _cut_crops(self, module, split: str, limit: int, roi: tuple[int, int, int], generator: torch.Generator):
        images, labels = [], []
        for number, batch in enumerate(module.volume_loader(split)):
            if number == limit:
                break
            label = batch["label"].reshape(batch["label"].shape[-3:])
            first_class = number * self.crops_per_case
            for image, crop in organ_centred_crops(batch["image"][0], label, roi, self.crops_per_case, generator, first_class):
                images.append(image)
                labels.append(crop)
        if not images:
            raise ValueError(f"SegmentationProbe: the labelled data has no {split} case to cut probe crops from; "
                             f"give more cases (data.phantom_cases, or a source with a validation section)")
        return torch.stack(images), torch.stack(labels)

    def setup_probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export once (a method that cannot be probed fails here, before training), build the network, cut the crops."""
        from lightning_mim.segmentation.networks import build_network

        name = type(pl_module).__name__
        if not callable(getattr(pl_module, "export_encoder", None)):
            raise TypeError(f"SegmentationProbe: {name} has no export_encoder(); the probe reads encoders through it")
        roi = getattr(pl_module, "input_size", None)
        if roi is None:
            raise ValueError(f"SegmentationProbe: {name} does not state its input_size (the probe's crop size)")
        roi = tuple(int(s) for s in roi)
        if any(s % self.feature_stride for s in roi):
            raise ValueError(f"SegmentationProbe: feature_stride {self.feature_stride} must divide the input size {roi}")
        try:
            export = pl_module.export_encoder()
        except (NotImplementedError, ValueError) as error:
            raise ValueError(f"SegmentationProbe: {name} cannot be probed, its encoder does not export: {error}") from error
        kwargs = dict(export.network_kwargs)
        in_channels = int(kwargs.pop("in_channels", 1))
        if export.target == "swin_unetr":  # the probe's forwards run without gradients: MONAI's fused attention path
            kwargs.setdefault("use_flash_attention", True)
        module = self.data_module(trainer, roi)
        module.prepare_data()
        module.setup()
        self.class_names = list(module.class_names)
        self._network = build_network(export.target, in_channels, len(self.class_names), roi, **kwargs).to(pl_module.device)
        self._network.requires_grad_(False)
        self._target = export.target
        generator = torch.Generator().manual_seed(self.seed)
        self._crops = {"fit": self._cut_crops(module, "train", self.fit_cases, roi, generator),
                       "eval": self._cut_crops(module, "val", self.eval_cases, roi, generator)}
        present = set(torch.unique(self._crops["eval"][1]).tolist())
        missing = [n for i, n in enumerate(self.class_names) if i and i not in present]
        if missing:
            rank_zero_warn(f"SegmentationProbe: no eval crop contains {', '.join(missing)}: no probe Dice for them "
                           f"(raise eval_cases or crops_per_case)")

    # ------------------------------------------------------------------ one probe
    def features(self, images: Tensor) -> Tensor:
        """Features of crops ``N×C×roi`` on the probe grid, one case's crops per forward pass."""
        from lightning_mim.segmentation.features import (
            encoder_features,
            features_on_grid,
        )

        device = next(self._network.parameters()).device
        grid = tuple(s // self.feature_stride for s in images.shape[2:])
        return torch.cat([features_on_grid(encoder_features(self._target, self._network, chunk.to(device)), grid)
                          for chunk in images.split(self.crops_per_case)])

    def probe(self, pl_module: L.LightningModule) -> dict[str, float]:
        """Per-organ probe Dice of the module's current encoder (call :meth:`setup_probe` first)."""
        from lightning_mim.segmentation.weights import EncoderFile, load_pretrained

        export = pl_module.export_encoder()
        file = EncoderFile(dict(export.state_dict), {"target": export.target, "network_kwargs": export.network_kwargs,
                                                     "method": type(pl_module).__name__})
        load_pretrained(self._network, file, log=None)
        self._network.eval()
        device = next(self._network.parameters()).device
        with torch.no_grad():
            fit = self.features(self._crops["fit"][0])
            evaluation = self.features(self._crops["eval"][0])
        grid = tuple(fit.shape[2:])
        fit, evaluation = voxel_rows(fit), voxel_rows(evaluation)
        mean, std = fit.mean(dim=0), fit.std(dim=0) + 1e-6
        fit, evaluation = (fit - mean) / std, (evaluation - mean) / std
        num_classes = len(self.class_names)
        targets = voxel_rows(soft_targets(self._crops["fit"][1].to(device), num_classes, grid))
        with torch.enable_grad():
            head = fit_head(fit, targets, self.head_hidden, self.head_steps, self.head_lr,
                            torch.Generator().manual_seed(self.seed + 1))
        labels = self._crops["eval"][1]
        with torch.no_grad():
            logits = head(evaluation).reshape(len(labels), *grid, num_classes).permute(0, 4, 1, 2, 3)
            predictions = torch.stack([
                F.interpolate(crop[None], size=tuple(labels.shape[1:]), mode="trilinear", align_corners=False)
                .argmax(dim=1)[0].cpu() for crop in logits])
        dice = pooled_dice(predictions[:, None], labels[:, None], num_classes)
        per_organ = {name: value for name, value in zip(self.class_names[1:], dice) if not math.isnan(value)}
        mean_dice = sum(per_organ.values()) / len(per_organ) if per_organ else float("nan")
        return {"probe/dice_mean": mean_dice, **{f"probe/dice/{name}": value for name, value in per_organ.items()}}

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Probe now, isolated from the training run, and log the result."""
        start = time.perf_counter()
        device_type = pl_module.device.type
        with isolate_rng(), torch.autocast(device_type, enabled=False):
            if self._network is None:
                self.setup_probe(trainer, pl_module)
            metrics = self.probe(pl_module)
        step = trainer.global_step
        self._last_step = step
        self._probe_seconds += time.perf_counter() - start
        elapsed = time.perf_counter() - self._train_start
        metrics["probe/seconds"] = time.perf_counter() - start
        metrics["probe/cost_fraction"] = self._probe_seconds / elapsed if elapsed > 0 else float("nan")
        self.history.append({"step": step, **metrics})
        organs = " ".join(f"{k.rsplit('/', 1)[1]} {v:.3f}" for k, v in metrics.items() if k.startswith("probe/dice/"))
        rank_zero_info(f"probe at step {step}: mean Dice {metrics['probe/dice_mean']:.3f} | {organs} "
                       f"({metrics['probe/seconds']:.1f} s)")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if step > 0 and not self._warned_cost and metrics["probe/cost_fraction"] > self.max_cost_fraction:
            self._warned_cost = True
            rank_zero_warn(f"SegmentationProbe has taken {metrics['probe/cost_fraction']:.0%} of the training time "
                           f"(budget {self.max_cost_fraction:.0%}): raise every_n_steps or lower crops/head_steps")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._probe_seconds = 0.0
        if not trainer.is_global_zero:
            return
        if self.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module)
        elif self._network is None:  # resumed: still fail early if the method cannot be probed
            with isolate_rng(), torch.autocast(pl_module.device.type, enabled=False):
                self.setup_probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)
