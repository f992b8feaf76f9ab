"""Command-line entry point: LightningCLI for fit/validate/test/predict plus project commands.

``python -m lightning_mim fit --config experiments/mae.yaml`` picks the method and the data module
by ``class_path`` in YAML (subclass mode), so experiments choose methods in configuration only.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mim.loggers import MIMWandbLogger
from lightning_mim.reliability.checkpoint_io import UNREADABLE, checkpoint_error, use_atomic_checkpoints
from lightning_mim.reliability.nan_guard import NonFiniteGuard
from lightning_mim.reliability.preemption import PreemptionCheckpoint, TrainingPreempted
from lightning_mim.reliability.resume import ResumeState, resume_checkpoint

# Project commands that are not Trainer stages: name → "module:function(argv)".
EXTRA_COMMANDS: dict[str, str] = {
    "export-encoder": "lightning_mim.segmentation.export_cli:main",
    "compare": "lightning_mim.segmentation.compare:main",
    "demo": "lightning_mim.demo:main",
    "check-data": "lightning_mim.reliability.check_data:main",
    "study": "lightning_mim.study.runner:main",
}

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs",
    "use_distributed_sampler": False,  # the data modules shard subjects themselves (TorchIO queue)
    "logger": {
        "class_path": "lightning_mim.loggers.MIMWandbLogger",
        "init_args": {"save_dir": "runs", "offline": True},
    },
}

# Default callbacks, replaceable from YAML (a list in a later config replaces the earlier one;
# ``--trainer.callbacks+=...`` appends).
DEFAULT_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "lightning_mim.callbacks.panels.TriplanarPanels", "init_args": {"every_n_steps": 200}},
    # Writes <run folder>/encoder.pt when pre-training ends; skips modules without export_encoder.
    {"class_path": "lightning_mim.callbacks.export.EncoderExport"},
]


# Callbacks every run gets, whatever its callback list says; configured under these top-level keys
# (e.g. ``--nan_guard.action skip``). See lightning_mim/reliability.
RELIABILITY_CALLBACKS: dict[str, type[L.Callback]] = {
    "nan_guard": NonFiniteGuard,
    "preemption": PreemptionCheckpoint,
    "resume_state": ResumeState,
}
SKIPPED_CASES_FILE = "skipped_cases.json"


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run folder (beside the checkpoints) and into W&B's run config.

    The file is named ``lightning_config.yaml`` so it never clashes with W&B's own ``config.yaml``.
    Cases the data module skipped (``on_bad_case: skip``) go beside it, as ``skipped_cases.json``,
    and into the W&B config as ``skipped_cases``.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_mim.callbacks.panels import run_directory

        text = self.parser.dump(self.config, skip_none=False)
        folder = run_directory(trainer)  # save_config runs on rank 0 only
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.config_filename).write_text(text)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if trainer.is_global_zero and experiment is not None and hasattr(experiment, "config"):
                experiment.config.update({"lightning_config": yaml.safe_load(text)}, allow_val_change=True)
                experiment.save(str(folder / self.config_filename), base_path=str(folder), policy="now")
        skipped = getattr(trainer.datamodule, "skipped_cases", None) if trainer.datamodule is not None else None
        if skipped and trainer.is_global_zero:
            (folder / SKIPPED_CASES_FILE).write_text(json.dumps(skipped, indent=1))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and hasattr(experiment, "config"):
                    experiment.config.update({"skipped_cases": skipped}, allow_val_change=True)


class MIMCLI(LightningCLI):
    """LightningCLI with the project's defaults (offline W&B, checkpoints, panels, no sampler injection)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True, "config_filename": "lightning_config.yaml", "save_to_log_dir": False},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            parser_kwargs={"default_env": True},
            args=args,
            run=run,
        )


    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})
        for key, callback in RELIABILITY_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_argument("--auto_resume", type=bool, default=True,
                            help="fit: without --ckpt_path, resume from the persisted run's newest checkpoint "
                                 "(last.ckpt or SLURM's hpc checkpoint); false starts a new run with a new W&B id")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyper-parameters first: a damaged file gets fit's clear error."""
        try:
            super()._parse_ckpt_path()
        except UNREADABLE as error:
            subcommand = self.config.get("subcommand")
            path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if not path:
                raise
            raise checkpoint_error(path, error) from error

    def before_instantiate_classes(self) -> None:
        """``--auto_resume false`` also stops the W&B logger from reusing the persisted run id."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand != "fit" or config is None or config.get("auto_resume", True):
            return
        loggers = config.get("trainer.logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("MIMWandbLogger"):
                logger["init_args.resume"] = False

    def before_fit(self) -> None:
        """Auto-resume: without ``--ckpt_path``, continue the persisted run from its newest checkpoint."""
        config = self.config_init["fit"]
        if config.get("ckpt_path") is not None or not config.get("auto_resume", True):
            return
        logger = self.trainer.logger
        if not isinstance(logger, MIMWandbLogger):
            return  # only the W&B logger persists a run to continue; use --ckpt_path otherwise
        path = resume_checkpoint(logger.run_dir, self.trainer.default_root_dir)
        if path is not None:
            config["ckpt_path"] = path
            rank_zero_info(f"auto-resume: continuing from {path} (--auto_resume false starts a new run)")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Puts ``default_root_dir`` in the W&B run's folder, unless the user pointed it elsewhere.

        Lightning writes SLURM's ``hpc_ckpt_<n>.ckpt`` to ``default_root_dir`` on the requeue signal
        and restores the highest-numbered one found there on restart. In the run folder
        (``<save_dir>/<project>/slurm-<job id>``) a requeued job finds exactly its own checkpoint
        beside its ``checkpoints/``, and never that of another job or sweep trial sharing ``save_dir``.
        Applies when ``default_root_dir`` is left at its default or equals the logger's ``save_dir``.
        """
        trainer_config = self._get(self.config_init, "trainer", default={})
        logger = trainer_config.get("logger")
        root = Path(str(trainer_config.get("default_root_dir") or TRAINER_DEFAULTS["default_root_dir"]))
        if isinstance(logger, MIMWandbLogger) and root in (Path(TRAINER_DEFAULTS["default_root_dir"]), Path(logger.save_dir)):
            kwargs.setdefault("default_root_dir", str(logger.run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def run_extra_command(name: str, argv: list[str]) -> int:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    return int(getattr(importlib.import_module(module_name), func)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        return run_extra_command(words[0], words[1:])
    try:
        MIMCLI(args=argv)
    except TrainingPreempted as preempted:  # a checkpoint was saved: a clean stop, resumable
        print(f"lightning_mim: {preempted}", file=sys.stderr)
        return 0
    finally:
        close_wandb_run()
    return 0


def close_wandb_run() -> None:
    """Finish the stage's W&B run so a later CLI call in the same process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
