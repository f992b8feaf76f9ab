"""``python -m lightning_mim check-data --config <experiment>.yaml [...]``: check every case before training.

It parses exactly what ``fit`` parses (the same CLI parser, configs composed left to right,
dotted overrides), builds only the ``data`` section's data module, lists every case that module
would read (all splits of a segmentation module), runs :mod:`data_modules.validation` on them and
prints one table. Exit code 0 when every case is usable, 1 otherwise. Results of good cases are
stored in the preprocessing cache, so the following ``fit`` does not re-read them.

Own options (before or after the config arguments):
    --json PATH     also write the reports as JSON
    --workers N     check N cases in parallel (spawned processes; default 0 = in this process)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentParser

from data_modules.sources import DataSourceError
from data_modules.validation import format_table, validate_cases


def _data_module(data_config: dict[str, Any]) -> L.LightningDataModule:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    return parser.instantiate_classes(parser.parse_object({"data": data_config})).data


def data_module_from_args(argv: list[str]) -> L.LightningDataModule:
    """The data module a ``fit`` with these arguments would build (nothing else is instantiated)."""
    from lightning_mim.cli import MIMCLI

    class ParseOnly(MIMCLI):
        def instantiate_classes(self) -> None:
            self.datamodule = _data_module(self.config.data.as_dict())

    with warnings.catch_warnings():  # argv differs from sys.argv by design (the command name)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ParseOnly(args=argv, run=False).datamodule


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(prog="python -m lightning_mim check-data", add_help=False)
    own.add_argument("--json", type=Path, default=None)
    own.add_argument("--workers", type=int, default=0)
    options, rest = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if not rest or rest[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    datamodule = data_module_from_args(rest)
    for required in ("cases_to_check", "validation_settings"):
        if not callable(getattr(datamodule, required, None)):
            raise SystemExit(f"check-data: {type(datamodule).__name__} has no {required}(); it cannot be checked")
    try:
        cases = datamodule.cases_to_check()
    except DataSourceError as error:  # the source itself is broken (missing folder, bad dataset.json ...)
        print(f"check-data: {error}", file=sys.stderr)
        return 1
    settings = datamodule.validation_settings()
    reports = validate_cases(cases, settings, datamodule.preprocessing, getattr(datamodule, "cache_dir", None),
                             num_workers=options.workers, report=lambda message: print(message, file=sys.stderr))
    print(format_table(reports))
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps({"settings": asdict(settings), "cases": [asdict(r) for r in reports]},
                                           indent=1))
    return 0 if all(r.ok for r in reports) else 1
