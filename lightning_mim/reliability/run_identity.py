"""Which run a ``fit`` continues: the one whose saved config is this command's, else a new one.

A run folder ``<save_dir>/<project>/<run id>/`` holds ``lightning_config.yaml``, the resolved
config the run was started with. Auto-resume continues a run only when the resolved config of the
command equals that file, apart from :data:`RESULT_NEUTRAL_KEYS` (settings that cannot change what
is trained). Any other difference starts a new run, with its own id and folder, and the CLI says
which settings differed. ``--resume_with_changes true`` continues the latest run anyway; the
differences are then appended to the run's ``config_changes.jsonl`` and the new config is saved
beside the original (never over it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILENAME = "lightning_config.yaml"
CHANGES_FILENAME = "config_changes.jsonl"

# Dotted config keys (fnmatch patterns) that cannot change the trained weights or metrics: where
# outputs go and how the run is identified or resumed, how progress is displayed, and whether W&B
# uploads. Everything else counts - including max_epochs / max_steps (the learning-rate schedule is
# laid out over them), num_workers (the workers' random streams are split by worker) and callbacks.
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "ckpt_path",
    "auto_resume",
    "resume_with_changes",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.logger.init_args.id",
    "trainer.logger.init_args.resume",
    "trainer.logger.init_args.offline",
    "trainer.logger.init_args.log_model",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.tags",
    "trainer.logger.init_args.group",
    "data.init_args.cache_dir",
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, {"c": 2}]}}`` → ``{"a.b[0]": 1, "a.b[1].c": 2}`` (empty containers kept as leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _neutral(key: str, neutral: Iterable[str]) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in neutral)


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       neutral: Iterable[str] = RESULT_NEUTRAL_KEYS) -> dict[str, tuple[Any, Any]]:
    """Settings that differ between two resolved configs: ``key -> (saved value, current value)``."""
    neutral = tuple(neutral)
    old, new = flatten(saved), flatten(current)
    missing = object()
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if not _neutral(key, neutral) and old.get(key, missing) != new.get(key, missing)}


def describe_differences(differences: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    """One line: ``model.init_args.lr 0.00015 -> 0.001, ...`` (the first ``limit`` keys, then a count)."""
    parts = [f"{key} {old!r} -> {new!r}" for key, (old, new) in list(differences.items())[:limit]]
    if len(differences) > limit:
        parts.append(f"and {len(differences) - limit} more")
    return ", ".join(parts)


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CONFIG_FILENAME
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def has_checkpoint(run_dir: Path) -> bool:
    """The run left something to resume from: ``last.ckpt`` or a SLURM ``hpc_ckpt_<n>.ckpt``."""
    return (run_dir / "checkpoints" / "last.ckpt").is_file() or any(run_dir.glob("hpc_ckpt_*.ckpt"))


def matching_run(save_dir: str | Path, project: str, config: dict[str, Any]) -> str | None:
    """Id of the newest resumable run under ``<save_dir>/<project>`` whose saved config is ``config``."""
    folder = Path(save_dir) / project
    if not folder.is_dir():
        return None
    candidates = []
    for run_dir in folder.iterdir():
        saved = saved_config(run_dir) if run_dir.is_dir() and has_checkpoint(run_dir) else None
        if saved is not None and not config_differences(saved, config):
            candidates.append(((run_dir / CONFIG_FILENAME).stat().st_mtime, run_dir.name))
    return max(candidates)[1] if candidates else None


def record_changes(run_dir: Path, differences: dict[str, tuple[Any, Any]]) -> None:
    """Appends an explicitly allowed resume-with-changes to the run's ``config_changes.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changes": {key: {"was": old, "now": new} for key, (old, new) in differences.items()}}
    with (run_dir / CHANGES_FILENAME).open("a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")


def config_path_for(run_dir: Path, stage: str, text: str) -> Path | None:
    """Where a stage's resolved config goes without overwriting another's; None when already saved.

    The run's first config is ``lightning_config.yaml``; a later stage or an allowed
    resume-with-changes whose config differs gets the next free ``lightning_config.<stage>-<n>.yaml``.
    """
    first = run_dir / CONFIG_FILENAME
    if not first.is_file():
        return first
    current = yaml.safe_load(text)
    for path in [first, *sorted(run_dir.glob(f"lightning_config.{stage}-*.yaml"))]:
        saved = yaml.safe_load(path.read_text())
        if isinstance(saved, dict) and not config_differences(saved, current):
            return None
    n = 1
    while (run_dir / f"lightning_config.{stage}-{n}.yaml").exists():
        n += 1
    return run_dir / f"lightning_config.{stage}-{n}.yaml"
