"""``python -m lightning_mim preprocess --config <experiment>.yaml [...]``: fill the cache before training.

It parses exactly what ``fit`` parses (the same CLI parser, configs composed left to right, dotted
overrides such as ``--data.init_args.cache_dir``), builds only the ``data`` section's data module,
and checks and preprocesses every case that module would read into its cache, one decode per case
(:mod:`data_modules.prepare`), with a progress bar and an ETA. A ``fit`` with the same arguments
then finds every entry and preprocesses nothing.

Work is split into deterministic shards - every n-th case in case-id order - so many processes or
nodes can fill one shared cache: ``--shard i/n`` (0-based), or, under a SLURM job array, the
array task's place in the array (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of
``SLURM_ARRAY_TASK_COUNT``; see ``experiments/slurm/preprocess_array.sbatch``). Concurrent writers
are safe: each entry is written under a lock, to temporaries renamed into place, and an entry
another process finished is reused; a rerun does only what is missing.

Own options (before or after the config arguments):
    --shard i/n     process shard i of n (default: the SLURM array task, else everything)
    --workers N     threads (default: the data module's preprocess_workers, else num_workers)
    --json PATH     also write what happened to each case of the shard as JSON
    --no-progress   log lines instead of a progress bar (e.g. for batch logs)

Exit code 0 when every case of the shard is usable - or the data module skips bad cases
(``on_bad_case: skip``) - and 1 otherwise, after listing every bad case with its file and problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from data_modules.prepare import prepare_cases, shard_cases
from data_modules.sources import DataSourceError
from data_modules.validation import bad_cases_message, format_table
from lightning_mim.reliability.check_data import data_module_from_args


def parse_shard(text: str | None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)`` from ``--shard i/n``, else from the SLURM array variables, else ``(0, 1)``."""
    environ = os.environ if environ is None else environ
    if text is not None:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise SystemExit(f"preprocess: --shard {text!r} must be i/n with integers, e.g. 0/4") from None
        if count < 1 or not 0 <= index < count:
            raise SystemExit(f"preprocess: --shard {text}: need 0 <= i < n")
        return index, count
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
        index = task - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        index //= step
        if not 0 <= index < count:
            raise SystemExit(f"preprocess: SLURM array task {task} is not one of the {count} tasks "
                             "(use a contiguous --array range, or --shard)")
        return index, count
    return 0, 1


def progress_bar(description: str, total: int):
    """A ``progress(done, total, seconds)`` callback drawing a tqdm bar (rate and ETA) on stderr, started now."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="case", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int, seconds: float) -> None:
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(prog="python -m lightning_mim preprocess", add_help=False)
    own.add_argument("--shard", default=None)
    own.add_argument("--workers", type=int, default=None)
    own.add_argument("--json", type=Path, default=None)
    own.add_argument("--no-progress", action="store_true")
    options, rest = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if not rest or rest[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    index, count = parse_shard(options.shard)
    datamodule = data_module_from_args(rest)
    for required in ("cases_to_check", "validation_settings", "preprocessing"):
        if getattr(datamodule, required, None) is None:
            raise SystemExit(f"preprocess: {type(datamodule).__name__} has no {required}; it has no cache to fill")
    try:
        cases = shard_cases(datamodule.cases_to_check(), index, count)
    except DataSourceError as error:  # the source itself is broken (missing folder, bad dataset.json ...)
        print(f"preprocess: {error}", file=sys.stderr)
        return 1
    workers = options.workers
    if workers is None:
        workers = getattr(datamodule, "preprocess_workers", getattr(datamodule, "num_workers", 0))

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    outcomes = prepare_cases(
        cases, datamodule.validation_settings(), datamodule.preprocessing, getattr(datamodule, "cache_dir", None),
        getattr(datamodule, "cache_storage", "float32"), workers, report=say,
        progress=None if options.no_progress or not cases else progress_bar(f"shard {index}/{count}", len(cases)))
    actions = Counter(outcome.action for outcome in outcomes)
    reports = [outcome.report for outcome in outcomes]
    print(f"shard {index}/{count}: {len(cases)} case(s): {actions['written']} preprocessed, "
          f"{actions['reused']} already cached, {actions['bad']} bad")
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps({
            "shard": [index, count],
            "cases": [{**asdict(o.report), "action": o.action, "entry": None if o.volume is None else str(o.volume.image.parent)}
                      for o in outcomes]}, indent=1))
    if actions["bad"]:
        print(format_table([r for r in reports if not r.ok]))
        if getattr(datamodule, "on_bad_case", "error") != "skip":
            print(bad_cases_message(reports, len(cases)), file=sys.stderr)
            return 1
    return 0
