"""Command-line entry point: LightningCLI for fit/validate/test/predict plus project commands.

``python -m lightning_mim fit --config experiments/mae.yaml`` picks the method and the data module
by ``class_path`` in YAML (subclass mode), so experiments choose methods in configuration only.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_mim.loggers import MIMWandbLogger

# Project commands that are not Trainer stages: name → "module:function(argv)".
EXTRA_COMMANDS: dict[str, str] = {
    "export-encoder": "lightning_mim.segmentation.export_cli:main",
    "compare": "lightning_mim.segmentation.compare:main",
    "demo": "lightning_mim.demo:main",
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


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run folder (beside the checkpoints) and into W&B's run config.

    The file is named ``lightning_config.yaml`` so it never clashes with W&B's own ``config.yaml``.
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
        return super().instantiate_trainer(**kwargs)


def run_extra_command(name: str, argv: list[str]) -> int:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    return int(getattr(importlib.import_module(module_name), func)(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        return run_extra_command(words[0], words[1:])
    try:
        MIMCLI(args=argv)
    finally:
        close_wandb_run()
    return 0


def close_wandb_run() -> None:
    """Finish the stage's W&B run so a later CLI call in the same process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
