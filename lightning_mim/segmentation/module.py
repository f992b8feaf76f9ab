"""Fine-tuning LightningModule: a segmentation network initialised from an exported encoder (or from scratch)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from monai.losses import DiceCELoss
from torch import Tensor

from lightning_mim.optimisation import adamw_warmup_cosine, parameter_groups, trainer_run_length
from lightning_mim.run_files import run_directory
from lightning_mim.segmentation.evaluation import (
    case_metrics,
    gather_by_case,
    mean_dice,
    metric_rows,
    organ_summary,
    sliding_window_logits,
    write_metrics_csv,
    write_prediction,
    write_summary_markdown,
)
from lightning_mim.segmentation.networks import build_network, layer_ids, network_spec
from lightning_mim.segmentation.weights import (
    EncoderFile,
    LoadReport,
    load_pretrained,
    preprocessing_differences,
    read_pretrained,
)

TEST_CSV = "test_metrics.csv"
TEST_SUMMARY = "test_summary.md"
#: Constructor arguments that only affect evaluation; not saved as hyper-parameters (see __init__).
EVALUATION_SETTINGS = ("sw_batch_size", "sw_overlap", "sw_mode", "sw_sigma_scale", "sw_stitch_device", "val_hd95",
                       "test_hd95", "test_nsd_tolerance", "prediction_dir")


def resolve_network(file: EncoderFile | None, network: str | None,
                    network_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any], list[str]]:
    """(target, constructor arguments, notices) from a pre-trained file and the configured network.

    ``network``/``network_kwargs`` describe the network built from scratch. With a pre-trained
    file its target and the arguments it records win (they define the weights); the configured
    arguments only add what the file leaves open (decoder width, norm, checkpointing...) and only
    when ``network`` is unset or names the same target. Every ignored setting is reported.
    """
    configured = dict(network_kwargs or {})
    if file is None:
        return network or "unetr", configured, []
    notes = []
    kwargs = file.network_kwargs
    if network is not None and network != file.target:
        notes.append(f"network={network!r} and its network_kwargs are ignored: {file.source} holds a "
                     f"{file.target!r} encoder, so the network is {file.target!r} built from the file's arguments")
        return file.target, kwargs, notes
    for key, value in configured.items():
        if key in kwargs and kwargs[key] != value:
            notes.append(f"network_kwargs.{key}={value!r} ignored: the pre-trained encoder was built with {kwargs[key]!r}")
        else:
            kwargs[key] = value
    return file.target, kwargs, notes


class SegmentationModule(L.LightningModule):
    """Segmentation fine-tuning with DiceCE, AdamW + warm-up/cosine, sliding-window evaluation.

    The network comes from the pre-trained file when there is one — its ``target`` and constructor
    arguments pick UNETR (ViT encoders), Swin UNETR (Swin encoders, SMIT's included) or the
    project's CNNs — so ``pretrained`` alone is enough; ``network``/``network_kwargs`` build one
    from scratch or override decoder settings (e.g. ``feature_size``).

    Args:
        num_classes: output classes, background included; must equal the data module's.
        pretrained: exported encoder (``encoder.pt``) or pre-training checkpoint (``.ckpt``).
        network: ``unetr``, ``swin_unetr``, ``stunet_encoder`` or ``hybridmim_unet`` to build from
            scratch (None: ``unetr``). A pre-trained file's target always wins (see :func:`resolve_network`).
        network_kwargs: constructor arguments (``in_channels``/``out_channels``/ROI excluded); with a
            pre-trained file they only fill in what the file does not record.
        in_channels: image channels; None = the pre-trained encoder's (1 from scratch). A different
            count adapts the pre-trained stem (see :func:`~.weights.adapt_input_channels`).
        roi_size: training patch and sliding-window size; UNETR position embeddings are
            interpolated when it differs from the pre-training ROI.
        method_name: label in result files; default the pre-trained file's method, or ``scratch``.
        lr, weight_decay, betas: AdamW (BTCV recipe: 1e-4, 1e-5).
        warmup_epochs, warmup_start_lr, min_lr: linear warm-up then cosine, per step.
        layer_decay: layer-wise LR decay: a parameter at encoder depth ``i`` of ``n`` gets
            ``lr·layer_decay^(n − i)`` (ViT: per block; Swin/CNN: per stage); decoder and head get
            ``lr``. 1 = off (SelfMedMAE UNETR: 0.75).
        freeze_encoder_epochs: encoder learning rate is 0 for this many epochs (then the schedule
            resumes). Implemented as a zero LR rather than ``requires_grad=False`` so DDP's gradient
            buckets never change; the encoder's gradients are still computed.
        exclude_from_weight_decay: no decay for biases, norms, position embeddings and tokens.
        sw_batch_size, sw_overlap, sw_mode, sw_sigma_scale: sliding-window settings (overlap 0.5,
            Gaussian blending).
        sw_stitch_device: where windows are accumulated; ``cpu`` for large volumes on a small GPU.
        val_hd95: also compute HD95 at validation (slow); test always reports it when ``test_hd95``.
        test_hd95: HD95 at test.
        test_nsd_tolerance: also the normalised surface Dice at test, at this tolerance in mm (None: off).
        prediction_dir: where ``predict`` writes NIfTI label maps; default ``<run folder>/predictions``.
        pretrained_from: provenance, set in checkpoints: the file the weights started from (not read).

    The ``sw_*``, ``*_hd95`` and ``prediction_dir`` settings are not stored in checkpoints, so
    ``test``/``predict --ckpt_path ...`` take them from the command line.
    """

    def __init__(
        self,
        num_classes: int,
        pretrained: str | None = None,
        network: str | None = None,
        network_kwargs: dict[str, Any] | None = None,
        in_channels: int | None = None,
        roi_size: int | tuple[int, int, int] = 96,
        method_name: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 50.0,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
        layer_decay: float = 1.0,
        freeze_encoder_epochs: float = 0.0,
        exclude_from_weight_decay: bool = True,
        sw_batch_size: int = 1,
        sw_overlap: float = 0.5,
        sw_mode: Literal["gaussian", "constant"] = "gaussian",
        sw_sigma_scale: float = 0.125,
        sw_stitch_device: str | None = None,
        val_hd95: bool = False,
        test_hd95: bool = True,
        test_nsd_tolerance: float | None = None,
        prediction_dir: str | None = None,
        pretrained_from: str | None = None,
    ) -> None:
        super().__init__()
        # Evaluation settings stay out of the checkpoint: LightningCLI re-applies a checkpoint's hyper-parameters
        # over the command line at test/predict time, which would make them impossible to change there.
        self.save_hyperparameters(ignore=list(EVALUATION_SETTINGS))
        self.sw_batch_size, self.sw_overlap, self.sw_mode = sw_batch_size, sw_overlap, sw_mode
        self.sw_sigma_scale, self.sw_stitch_device = sw_sigma_scale, sw_stitch_device
        self.val_hd95, self.test_hd95, self.prediction_dir = val_hd95, test_hd95, prediction_dir
        self.test_nsd_tolerance = test_nsd_tolerance
        if test_nsd_tolerance is not None and test_nsd_tolerance < 0:
            raise ValueError(f"test_nsd_tolerance must be >= 0 mm, got {test_nsd_tolerance}")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if freeze_encoder_epochs < 0:
            raise ValueError(f"freeze_encoder_epochs must be >= 0, got {freeze_encoder_epochs}")
        if not 0.0 <= sw_overlap < 1.0 or sw_batch_size < 1:
            raise ValueError(f"need 0 <= sw_overlap < 1 and sw_batch_size >= 1, got {sw_overlap} and {sw_batch_size}")
        file = read_pretrained(pretrained) if pretrained else None
        self.network_name, kwargs, notes = resolve_network(file, network, network_kwargs)
        for note in notes:
            rank_zero_warn(note)
        pretrained_channels = kwargs.pop("in_channels", 1)
        self.in_channels = int(in_channels or pretrained_channels)
        self.roi_size = tuple(int(s) for s in (roi_size if isinstance(roi_size, (list, tuple)) else (roi_size,) * 3))
        self.network = build_network(self.network_name, self.in_channels, num_classes, self.roi_size, **kwargs)
        self.load_report: LoadReport | None = None
        self.pretrained_meta: dict[str, Any] | None = dict(file.meta) if file is not None else None
        if file is not None:
            self.load_report = load_pretrained(self.network, file, log=rank_zero_info)
        self.method_name = method_name or (file.method if file is not None else "scratch")
        if file is not None:
            # A checkpoint holds the pre-trained weights: it records the network the file decided on,
            # so test/predict rebuild it without the file, which may since have moved or gone.
            source = pretrained if isinstance(pretrained, (str, os.PathLike)) else file.source
            self.hparams.update(pretrained=None, pretrained_from=str(source), network=self.network_name,
                                network_kwargs=dict(kwargs), in_channels=self.in_channels, method_name=self.method_name)
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
        self._results: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ forward and training
    def forward(self, image: Tensor) -> Tensor:
        return self.network(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self.network(batch["image"])
        loss = self.loss(logits.float(), batch["label"])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=int(batch["image"].shape[0]))
        return loss

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != self.hparams.num_classes:
            raise ValueError(f"the model has num_classes={self.hparams.num_classes} but the data has {classes} "
                             f"classes ({datamodule.class_names}); set model.num_classes: {classes}")
        patch = getattr(datamodule, "patch_size", None)
        if patch is not None and tuple(patch) != self.roi_size:
            raise ValueError(f"the model's roi_size {self.roi_size} differs from the data's patch_size {tuple(patch)}")
        self.check_data_matches(datamodule)

    def check_data_matches(self, datamodule: Any) -> None:
        """Error on an input channel count the network cannot take; warn for each preprocessing setting
        of the data that differs from the encoder's pre-training (see :func:`~.weights.preprocessing_differences`)."""
        channels = getattr(datamodule, "in_channels", None)
        if channels is not None and int(channels) != self.in_channels:
            raise ValueError(f"the data have {channels} image channel(s) but the network takes {self.in_channels}; "
                             f"set model.in_channels: {channels} (a pre-trained stem is adapted to it)")
        describe = getattr(datamodule, "describe", None)
        if self.pretrained_meta is None or not callable(describe):
            return
        for note in preprocessing_differences(self.pretrained_meta, describe()):
            rank_zero_warn(f"{self.hparams.pretrained_from}: {note}")

    # ------------------------------------------------------------------ evaluation
    def predict_volume(self, image: Tensor) -> Tensor:
        """Class map ``B×D×H×W`` of whole volumes by sliding windows of the ROI."""
        logits = sliding_window_logits(self.network, image, self.roi_size, self.sw_batch_size, self.sw_overlap,
                                       self.sw_mode, self.sw_sigma_scale, self.sw_stitch_device)
        return logits.argmax(dim=1)

    def _evaluate(self, batch: dict[str, Any], hd95: bool, nsd_tolerance: float | None = None) -> None:
        prediction = self.predict_volume(batch["image"])
        for i, case_id in enumerate(batch["case_id"]):
            spacing = batch["spacing"][i].tolist() if "spacing" in batch else None
            metrics = case_metrics(prediction[i], batch["label"][i, 0], self.hparams.num_classes, spacing, hd95,
                                   nsd_tolerance)
            self._results.append({"case_id": case_id, **metrics})

    def _class_names(self) -> list[str]:
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        return list(names) if names else ["background", *[f"class_{i}" for i in range(1, self.hparams.num_classes)]]

    def _result_columns(self) -> dict[str, Any]:
        describe = getattr(getattr(self.trainer, "datamodule", None), "describe", None)
        data = describe() if callable(describe) else {}
        return {"dataset": data.get("dataset"), "method": self.method_name, "label_fraction": data.get("label_fraction"),
                "num_labelled": data.get("num_labelled"), "seed": data.get("seed")}

    def _log_summary(self, stage: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        summary = organ_summary(rows)
        self.log(f"{stage}/dice", mean_dice(summary), prog_bar=stage == "val")
        for organ in summary:
            self.log(f"{stage}/dice/{organ['organ']}", organ["dice_mean"])
            if not math.isnan(organ["hd95_mean"]):
                self.log(f"{stage}/hd95/{organ['organ']}", organ["hd95_mean"])
        return summary

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_hd95)

    def on_validation_epoch_end(self) -> None:
        results = gather_by_case(self._results)
        self._results = []
        if results:
            self._log_summary("val", metric_rows(results, self._class_names()))

    def on_test_epoch_start(self) -> None:
        self._results = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_hd95, self.test_nsd_tolerance)

    def on_test_epoch_end(self) -> None:
        results = gather_by_case(self._results)
        self._results = []
        columns = self._result_columns()
        rows = metric_rows(results, self._class_names(), **columns)
        self._log_summary("test", rows)
        if not self.trainer.is_global_zero or not rows:
            return
        folder = self.run_folder()
        csv_path = write_metrics_csv(rows, folder / TEST_CSV)
        write_summary_markdown(rows, folder / TEST_SUMMARY, title=f"Test results — {self.method_name}")
        rank_zero_info(f"test metrics written to {csv_path} and {folder / TEST_SUMMARY}")
        for logger in self.trainer.loggers:  # W&B: the files travel with the run (offline folders, sync, download)
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "summary") and hasattr(experiment, "save"):
                experiment.summary.update({"test/dataset": columns["dataset"], "test/method": self.method_name,
                                           "test/label_fraction": columns["label_fraction"],
                                           "test/num_labelled": columns["num_labelled"]})
                for path in (csv_path, folder / TEST_SUMMARY):
                    experiment.save(str(path), base_path=str(folder), policy="now")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        """Writes each case's label map as NIfTI in its original geometry; returns the paths."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "original_geometry"):
            raise RuntimeError("predict needs a data module that knows each case's original geometry "
                               "(data_modules.segmentation.SegmentationDataModule)")
        folder = Path(self.prediction_dir) if self.prediction_dir else self.run_folder() / "predictions"
        prediction = self.predict_volume(batch["image"])
        written = []
        for i, case_id in enumerate(batch["case_id"]):
            geometry = datamodule.original_geometry(case_id)
            path = write_prediction(prediction[i], geometry, folder / f"{case_id}.nii.gz")
            print(f"predict: {geometry['source']} -> {path}", flush=True)  # every rank writes its own cases
            written.append({"case_id": case_id, "path": str(path)})
        return written

    def run_folder(self) -> Path:
        return run_directory(self.trainer)

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups by (layer-decay scale, weight decay, encoder or not); each carries ``lr_scale``."""
        hp = self.hparams
        depth, top = layer_ids(self.network_name, self.network)
        prefix = network_spec(self.network_name).encoder_prefix
        return parameter_groups(self.network.named_parameters(), hp.weight_decay, hp.exclude_from_weight_decay,
                                lr_scale=lambda name: hp.layer_decay ** (top - depth[name]),
                                is_encoder=lambda name: name.startswith(prefix))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.parameter_groups(), trainer_run_length(self.trainer), hp.lr, hp.betas,
                                   warmup_epochs=hp.warmup_epochs, warmup_start_lr=hp.warmup_start_lr,
                                   min_lr=hp.min_lr, freeze_encoder_epochs=hp.freeze_encoder_epochs)
