"""Command-line entry point: LightningCLI for fit/validate/test/predict plus project commands.

``python -m lightning_mim fit --config experiments/mae.yaml`` picks the method and the data module
by ``class_path`` in YAML (subclass mode), so experiments choose methods in configuration only.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from lightning_mim.config_checks import ConfigError, check_config
from lightning_mim.console import mute_known_library_noise, program_name
from lightning_mim.loggers import MIMWandbLogger, persisted_run_id, slurm_run_id
from lightning_mim.recipes import RecipeNotFound, resolve_config_arguments, shipped_recipes
from lightning_mim.reliability.checkpoint_io import UNREADABLE, checkpoint_error, use_atomic_checkpoints
from lightning_mim.reliability.nan_guard import NonFiniteGuard
from lightning_mim.reliability.preemption import PreemptionCheckpoint, TrainingPreempted
from lightning_mim.reliability.resume import ResumeState, resume_checkpoint
from lightning_mim.reliability.run_identity import (
    config_differences,
    config_path_for,
    describe_differences,
    has_checkpoint,
    matching_run,
    record_changes,
    saved_config,
)
from lightning_mim.run_files import atomic_write, run_directory

# Project commands that are not Trainer stages: name → "module:function(argv)".
EXTRA_COMMANDS: dict[str, str] = {
    "export-encoder": "lightning_mim.segmentation.export_cli:main",
    "compare": "lightning_mim.segmentation.compare:main",
    "demo": "lightning_mim.demo:main",
    "check-data": "lightning_mim.reliability.check_data:main",
    "preprocess": "lightning_mim.preprocess:main",
    "study": "lightning_mim.study.runner:main",
}

# One line per LightningCLI stage for ``--help`` (Lightning's own docstrings describe the Trainer method).
STAGE_SUMMARIES: dict[str, str] = {
    "fit": "Train a method or a segmentation network from --config recipes; writes the run folder.",
    "validate": "Evaluate a model on the validation split (weights from --ckpt_path).",
    "test": "Evaluate on the test split; fine-tuning writes per-organ Dice and HD95 (test_metrics.csv).",
    "predict": "Run a model on data; segmentation writes label maps as NIfTI in the input geometry.",
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
        text = self.parser.dump(self.config, skip_none=False)
        folder = run_directory(trainer)  # save_config runs on rank 0 only
        # Never over another config of the run: a later stage (or an allowed resume with changes)
        # that differs gets lightning_config.<stage>-<n>.yaml; an identical one is not written again.
        stage_name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        path = config_path_for(folder, stage_name, text) if trainer.is_global_zero else None
        if path is not None:
            atomic_write(path, text)  # auto-resume compares it with later commands: never half a file
            key = "lightning_config" if path.name == self.config_filename else path.stem.replace(".", "_")
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and hasattr(experiment, "config"):
                    experiment.config.update({key: yaml.safe_load(text)}, allow_val_change=True)
                    # Written inside W&B's own files folder, so it is saved as is (no symlink, no W&B warning).
                    in_run = Path(experiment.dir) / path.name
                    in_run.write_text(text)
                    experiment.save(str(in_run), base_path=experiment.dir, policy="now")
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
            parser_kwargs={"default_env": True, "prog": program_name()},
            args=args,
            run=run,
        )


    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})
        for key, callback in RELIABILITY_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_argument("--auto_resume", type=bool, default=True,
                            help="fit: without --ckpt_path, resume from the persisted run's newest checkpoint "
                                 "(last.ckpt or SLURM's hpc checkpoint) when its saved config is this one; "
                                 "false starts a new run with a new W&B id")
        parser.add_argument("--resume_with_changes", type=bool, default=False,
                            help="fit: continue the latest run even though settings differ from its saved config "
                                 "(the differences are recorded in the run's config_changes.jsonl)")

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
        """Configuration checks (sizes, class counts); refuse a stray ``default_root_dir``; for ``fit``,
        choose the run this command continues or starts."""
        self.check_arguments()
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None:
            return
        logger = wandb_logger_config(config)
        if logger is None:
            return  # without the W&B logger, default_root_dir is the run folder and --ckpt_path resumes
        save_dir = str(logger.get("init_args.save_dir") or TRAINER_DEFAULTS["logger"]["init_args"]["save_dir"])
        root = config.get("trainer.default_root_dir")
        if root is not None and Path(str(root)).resolve() not in {Path(TRAINER_DEFAULTS["default_root_dir"]).resolve(),
                                                                   Path(save_dir).resolve()}:
            raise SystemExit(f"lightning_mim: --trainer.default_root_dir {root} would not hold this run's outputs: with "
                             "the W&B logger every output (checkpoints, config, panels, encoder, metrics, W&B files) "
                             f"goes under --trainer.logger.init_args.save_dir (now {save_dir}); set that instead")
        if self.subcommand != "fit":
            return
        if not config.get("auto_resume", True):
            logger["init_args.resume"] = False  # also stops the logger from reusing the persisted run id
        elif rank_zero_only.rank == 0:  # other ranks read the id rank 0 chose (loggers.resolve_run_id)
            self._choose_run(config, logger, save_dir)

    def _choose_run(self, config, logger, save_dir: str) -> None:
        """Continue the run whose saved config is this command's resolved config, else start a new one.

        See :mod:`lightning_mim.reliability.run_identity`. An id fixed from outside (``--...id``,
        a sweep's ``WANDB_RUN_ID``, a SLURM job) names the run: a differing saved config is refused.
        """
        self._config_changes = None
        project = str(logger.get("init_args.project") or "lightning-mim")
        current = yaml.safe_load(self._parser("fit").dump(config, skip_none=False))
        allow = bool(config.get("resume_with_changes", False))
        fixed = logger.get("init_args.id") or os.environ.get("WANDB_RUN_ID") or slurm_run_id()
        if fixed:
            run_dir = Path(save_dir) / project / str(fixed)
            saved = saved_config(run_dir) if has_checkpoint(run_dir) else None
            differences = config_differences(saved, current) if saved is not None else {}
            if differences and not allow:
                raise SystemExit(f"lightning_mim: run {fixed} in {run_dir} was started with other settings "
                                 f"({describe_differences(differences)}); choose another run id or save_dir, or "
                                 "pass --resume_with_changes true to continue it with these")
            self._config_changes = (run_dir, differences) if differences else None
            return
        match = matching_run(save_dir, project, current)
        if match is not None:
            logger["init_args.id"] = match
            return
        latest = persisted_run_id(save_dir)
        latest_dir = Path(save_dir) / project / latest if latest else None
        saved = saved_config(latest_dir) if latest_dir is not None and has_checkpoint(latest_dir) else None
        differences = config_differences(saved, current) if saved is not None else {}
        if allow and saved is not None:
            logger["init_args.id"] = latest
            self._config_changes = (latest_dir, differences) if differences else None
            return
        run_id = secrets.token_hex(4)
        logger["init_args.id"] = run_id
        if saved is not None:
            rank_zero_info(f"new run {run_id}: the latest run {latest} in {Path(save_dir) / project} was started with "
                           f"other settings ({describe_differences(differences)}); it is left as it was")

    def check_arguments(self) -> None:
        """Raise :class:`~lightning_mim.config_checks.ConfigError` for sizes or counts that cannot work,
        before anything is built (:mod:`lightning_mim.config_checks`)."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is not None:
            check_config(config.as_dict())

    def before_fit(self) -> None:
        """Auto-resume: without ``--ckpt_path``, continue the chosen run from its newest checkpoint."""
        config = self.config_init["fit"]
        if config.get("ckpt_path") is not None or not config.get("auto_resume", True):
            return
        logger = self.trainer.logger
        if not isinstance(logger, MIMWandbLogger):
            return  # only the W&B logger persists a run to continue; use --ckpt_path otherwise
        path = resume_checkpoint(logger.run_dir, self.trainer.default_root_dir)
        if path is None:
            return
        config["ckpt_path"] = path
        changes = getattr(self, "_config_changes", None)
        if changes is not None and self.trainer.is_global_zero:
            run_dir, differences = changes
            record_changes(run_dir, differences)
            rank_zero_info(f"auto-resume with changes ({describe_differences(differences)}), recorded in "
                           f"{run_dir / 'config_changes.jsonl'}: continuing from {path}")
        else:
            rank_zero_info(f"auto-resume: continuing from {path}, the run started with this config "
                           "(--auto_resume false starts a new run)")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Puts ``default_root_dir`` in the W&B run's folder.

        Lightning writes SLURM's ``hpc_ckpt_<n>.ckpt`` to ``default_root_dir`` on the requeue signal
        and restores the highest-numbered one found there on restart. In the run folder
        (``<save_dir>/<project>/slurm-<job id>``) a requeued job finds exactly its own checkpoint
        beside its ``checkpoints/``, and never that of another job or sweep trial sharing ``save_dir``.
        (A ``default_root_dir`` other than the default or ``save_dir`` was refused before.)
        """
        logger = self._get(self.config_init, "trainer", default={}).get("logger")
        if isinstance(logger, MIMWandbLogger):
            kwargs.setdefault("default_root_dir", str(logger.run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def wandb_logger_config(config) -> Any | None:
    """The (first) ``MIMWandbLogger`` entry of a parsed, not yet instantiated, trainer config."""
    loggers = config.get("trainer.logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("MIMWandbLogger"):
            return logger
    return None


def run_extra_command(name: str, argv: list[str]) -> int:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    return int(getattr(importlib.import_module(module_name), func)(argv) or 0)


def command_summary(target: str) -> str:
    """First docstring line of a project command's module, read without importing it, minus its usage prefix."""
    module_name = target.split(":")[0]
    spec = importlib.util.find_spec(module_name)
    source = Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else ""
    line = (ast.get_docstring(ast.parse(source)) or "").strip().splitlines()[:1]
    text = line[0] if line else ""
    if text.startswith("``") and ": " in text:  # "``python -m lightning_mim demo``: what it does"
        text = text.split(": ", 1)[1]
    return text[:1].upper() + text[1:]


def top_level_help() -> str:
    """Every command with one line: the LightningCLI stages, then the project commands (EXTRA_COMMANDS)."""
    prog = program_name()
    rows = [(name, STAGE_SUMMARIES.get(name, "")) for name in LightningCLI.subcommands()]
    extra = [(name, command_summary(target)) for name, target in EXTRA_COMMANDS.items()]
    width = max(len(name) for name, _ in rows + extra) + 2
    lines = [f"usage: {prog} <command> [options]", "",
             "Masked image modeling pre-training and segmentation fine-tuning of 3D medical images.", "",
             "training stages (LightningCLI: --config FILE, repeatable; dotted overrides such as --model.lr 1e-4):"]
    lines += [f"  {name:<{width}}{text}" for name, text in rows]
    lines += ["", "project commands:"]
    lines += [f"  {name:<{width}}{text}" for name, text in extra]
    recipes = [name.removesuffix(".yaml") for name in shipped_recipes() if "/" not in name]
    lines += ["", f"shipped recipes (--config NAME works from any folder): {', '.join(recipes)};",
              "  also trainer/<cpu|gpu|multi_gpu|multi_node>, demo/<name>, sweeps/<name> (docs: README, Configs)"]
    lines += ["", f"'{prog} <command> --help' lists the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    mute_known_library_noise()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] in ("-h", "--help"):
        print(top_level_help())
        return 0 if words else 2
    try:
        words = resolve_config_arguments(words)
    except RecipeNotFound as error:
        print(f"{program_name()}: {error}", file=sys.stderr)
        return 2
    if words and words[0] in EXTRA_COMMANDS:
        return run_extra_command(words[0], words[1:])
    try:
        MIMCLI(args=words)
    except ConfigError as error:  # one line per problem, no traceback: nothing was built yet
        for line in str(error).splitlines():
            print(f"lightning_mim: error: {line}", file=sys.stderr)
        return 2
    except TrainingPreempted as preempted:  # a checkpoint was saved: a clean stop, resumable
        print(f"lightning_mim: {preempted}", file=sys.stderr)
        return 0
    finally:
        close_wandb_run()
    return 0


def close_wandb_run() -> None:
    """Finish the stage's W&B run so a later CLI call in the same process starts its own, and wait
    until its files are complete: ``finish`` returns before the W&B service has closed the run's
    transaction log, so a caller reading the run right after a CLI call could see it cut short;
    ``teardown`` waits for the service to exit (the next run starts a new one)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
        wandb.teardown()
