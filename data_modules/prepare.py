"""Check and preprocess cases on ONE decode each: what the data modules and ``preprocess`` run before training.

For every case, under its cache entry's writer lock (:func:`~data_modules.cache.entry_lock`):

* a finished entry whose stored check result matches the current check settings is reused -
  nothing is read (also when another process finished it a moment ago);
* otherwise the files are checked (:func:`~data_modules.validation.inspect_case`: file, header,
  then the decoded voxels) and, when good, the *same decoded volumes* are preprocessed and stored
  (:func:`~data_modules.cache.preprocess_case`). Checking, then reading again to preprocess, had
  cost twice the decoding time of a cold cache;
* a case that passes the checks but fails while being preprocessed (an unusual orientation, a
  resampler error, a non-finite result) is a bad case like any other: it gets a problem naming its
  file, and ``on_bad_case`` decides (``error``: one error listing every bad case before training;
  ``skip``: dropped and recorded) - never a crash in the middle of the corpus.

Cases are spread over ``num_workers`` threads (:func:`~data_modules.cache.map_cases`) and can be
split into deterministic shards (:func:`shard_cases`) so that many processes or SLURM array tasks
fill one shared cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import (
    STORAGE_FORMATS,
    CachedVolume,
    CacheStorage,
    _load_entry,
    cache_key,
    cached_validation,
    default_cache_dir,
    entry_dir,
    entry_lock,
    log_progress,
    map_cases,
    preprocess_case,
    record_validation,
)
from .presets import Preprocessing, PreprocessingError
from .sources import Case, DataSourceError
from .validation import (
    CaseReport,
    OnBadCase,
    ValidationSettings,
    inspect_case,
    select_good_cases,
    unexpected_failure,
)

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The outcome for one case: its check report, its entry when usable, and what this call did."""

    report: CaseReport
    volume: CachedVolume | None
    action: str  # "reused" (nothing read), "written" (decoded, checked, stored) or "bad"


def _report_from_record(case: Case, record: dict) -> CaseReport:
    return CaseReport(case.case_id, str(case.image), None if case.label is None else str(case.label),
                      shape=record.get("shape"), spacing=record.get("spacing"), intensity=record.get("intensity"),
                      label_values=record.get("label_values"), from_cache=True)


def prepare_case(case: Case, settings: ValidationSettings, preprocessing: Preprocessing, cache_root: Path,
                 channels: int = 1, storage: CacheStorage = "float32") -> Prepared:
    """Reuse, or check and preprocess, one case (see the module docstring); never raises for a bad case."""
    try:
        directory = entry_dir(cache_root, case, cache_key(case, preprocessing, channels, storage))
    except OSError as error:  # a source that cannot be stat'ed: the checks say why (dangling link, ...)
        try:
            report = inspect_case(case, settings)[0]
        except Exception as failure:  # noqa: BLE001 - still a reported case
            report = unexpected_failure(case, failure)
        if report.ok:
            report.add(case.image, f"cannot be inspected ({error})")
        return Prepared(report, None, "bad")
    fingerprint = settings.fingerprint()

    def passed(record: dict | None) -> bool:
        return bool(record) and record.get("fingerprint") == fingerprint and bool(record.get("ok"))

    try:
        with entry_lock(directory):
            entry, record = _load_entry(directory, case.case_id), cached_validation(directory)
            if entry is not None and passed(record):
                return Prepared(_report_from_record(case, record), entry, "reused")
            if passed(record):  # checked before (check-data), not yet preprocessed: one read, no re-check
                report, decoded = _report_from_record(case, record), None
            else:
                report, decoded = inspect_case(case, settings)
                if not report.ok:
                    return Prepared(report, None, "bad")
            checks = report.record(settings) if not report.from_cache else record
            if entry is not None:  # preprocessed under other check settings: only the checks were missing
                record_validation(directory, checks)
                return Prepared(report, entry, "reused")
            try:
                volume = preprocess_case(case, preprocessing, cache_root, channels, checks, storage,
                                         image=None if decoded is None else decoded.image,
                                         label=None if decoded is None else decoded.label)
            except (DataSourceError, PreprocessingError) as error:
                report.problems.append(str(error))  # these messages already name the file
                return Prepared(report, None, "bad")
            except Exception as error:  # noqa: BLE001 - a failing case is reported, the corpus goes on
                report.add(case.image, f"cannot be preprocessed ({type(error).__name__}: {error})"[:500])
                return Prepared(report, None, "bad")
            return Prepared(report, volume, "written")
    except Exception as error:  # noqa: BLE001 - e.g. the lock cannot be taken: still a reported case
        return Prepared(unexpected_failure(case, error), None, "bad")


def shard_cases(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th case in case-id order, so every process
    computes the same split whatever the discovery order, and the shards are disjoint and cover all cases."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return sorted(cases, key=lambda case: case.case_id)[index::count]


def prepare_cases(
    cases: Sequence[Case],
    settings: ValidationSettings,
    preprocessing: Preprocessing,
    cache_dir: str | os.PathLike | None = None,
    storage: CacheStorage = "float32",
    num_workers: int = 0,
    report: Callable[[str], None] = log.info,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Prepared]:
    """:func:`prepare_case` for every case (same order), in ``num_workers`` threads."""
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"cache storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    todo = []
    for index, case in enumerate(cases):
        try:
            if _load_entry(entry_dir(cache_root, case, cache_key(case, preprocessing, settings.channels, storage)),
                           case.case_id) is None:
                todo.append(index)
        except OSError:
            todo.append(index)  # prepare_case reports it
    if todo:
        report(f"checking and preprocessing {len(todo)} of {len(cases)} case(s) into {cache_root}")
    return map_cases(lambda case: prepare_case(case, settings, preprocessing, cache_root, settings.channels, storage),
                     list(cases), num_workers, progress or log_progress(report, verb="prepared"))


def prepare_and_select(
    cases: Sequence[Case],
    settings: ValidationSettings,
    preprocessing: Preprocessing,
    on_bad_case: OnBadCase,
    cache_dir: str | os.PathLike | None = None,
    storage: CacheStorage = "float32",
    num_workers: int = 0,
    report: Callable[[str], None] = log.info,
    warn: Callable[[str], None] = log.warning,
) -> tuple[list[CachedVolume], list[dict[str, Any]]]:
    """(cache entries of the usable cases, summaries of skipped ones) under the ``on_bad_case`` policy.

    ``error`` raises one :class:`DataSourceError` listing every bad case; ``skip`` drops them
    (announced through ``warn``) but still raises when none is left.
    """
    outcomes = prepare_cases(cases, settings, preprocessing, cache_dir, storage, num_workers, report)
    _, skipped = select_good_cases(cases, [o.report for o in outcomes], on_bad_case)
    if skipped:
        lines = [f"  - {item['case_id']}: " + "; ".join(item["problems"]) for item in skipped]
        warn(f"on_bad_case=skip: skipping {len(skipped)} of {len(cases)} case(s) that failed the data checks "
             "or preprocessing:\n" + "\n".join(lines))
    return [o.volume for o in outcomes if o.volume is not None], skipped
