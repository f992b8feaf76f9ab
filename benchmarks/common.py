"""Measurement plumbing shared by every benchmark: isolated processes, timing, memory, machine, writers.

* :func:`run_isolated` runs one measurement in a fresh child forked from a fork server that has
  already imported torch, MONAI, TorchIO and Lightning, so each measurement starts from the same
  clean heap (its peak memory is its own, not the leftovers of earlier ones) without paying the
  imports again. The child reports its peak RSS (``ru_maxrss``) next to its start RSS.
* :func:`interleaved_timings` times several step functions round-robin (A, B, A, B, ...) after
  warm-up and reports medians: both sides of a comparison see the same machine load.
* :class:`MemorySampler` follows a process *and its children* (DataLoader and preprocessing
  workers) with psutil, recording the peak of the summed RSS and of the summed private memory
  (proportional anonymous + shared-memory pages). Pages of memory-mapped files count in RSS but are
  page cache the kernel can drop, so private memory is the figure that shows real RAM use.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

MB = 1024**2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Imported once by the fork server; every measurement child starts with them loaded.
PRELOAD = ("numpy", "torch", "monai", "torchio", "lightning", "timm", "SimpleITK", "nibabel", "benchmarks.common")


class IsolatedRunError(RuntimeError):
    """A measurement child failed or timed out; the message holds its traceback."""


# --------------------------------------------------------------------------- isolated children
_CONTEXT: multiprocessing.context.BaseContext | None = None


def _context() -> multiprocessing.context.BaseContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(list(PRELOAD))
    return _CONTEXT


def _child_main(connection, target: Callable[..., Any], args: tuple, kwargs: dict, threads: int) -> None:
    import torch

    # A forkserver child inherits "forkserver" as its default start method; DataLoader workers must be
    # forked as in an ordinary training process (else whole datasets are pickled to the fork server).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    start_rss = psutil.Process().memory_info().rss
    try:
        result = target(*args, **kwargs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        connection.send(("ok", result, {"start_rss_mb": start_rss / MB, "peak_rss_mb": peak / MB}))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which raises
        connection.send(("error", traceback.format_exc(), None))
    finally:
        connection.close()


def run_isolated(target: Callable[..., Any], *args: Any, timeout: float = 1800.0, threads: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """``target(*args, **kwargs)`` in a fresh child process; returns its result dict plus ``"process"``.

    ``target`` must be a module-level function of an importable module and return a picklable
    dict. ``"process"`` holds the child's RSS at start (imports only) and its peak RSS.
    """
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    threads = threads or max(1, os.cpu_count() or 1)
    process = context.Process(target=_child_main, args=(sender, target, args, kwargs, threads))
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise IsolatedRunError(f"{target.__name__} did not finish within {timeout:.0f} s")
        status, payload, process_info = receiver.recv()
    except EOFError:
        raise IsolatedRunError(f"{target.__name__} died without a result (exit code {process.exitcode})") from None
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise IsolatedRunError(f"{target.__name__} failed:\n{payload}")
    return {**payload, "process": process_info}


# --------------------------------------------------------------------------- timing
def summarize(samples: Sequence[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": [round(s, 5) for s in samples]}


def interleaved_timings(steps: Mapping[str, Callable[[], Any]], warmup: int = 1, repeats: int = 3) -> dict[str, dict]:
    """Median wall time of each step, timed round-robin after ``warmup`` untimed calls of each."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


# --------------------------------------------------------------------------- memory
def _private_bytes(process: psutil.Process) -> int:
    """Proportional anonymous + shared-memory bytes (``smaps_rollup``); RSS minus file pages as a fallback."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line and not line[0].isdigit())
        return sum(int(fields[key].split()[0]) * 1024 for key in ("Pss_Anon", "Pss_Shmem") if key in fields)
    except (OSError, KeyError, ValueError):
        info = process.memory_info()
        return info.rss - getattr(info, "shared", 0)


def tree_memory(pid: int | None = None) -> tuple[int, int]:
    """(summed RSS, summed private bytes) of a process and all its descendants."""
    root = psutil.Process(pid)
    rss = private = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss += process.memory_info().rss
            private += _private_bytes(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, private


class MemorySampler:
    """Context manager sampling :func:`tree_memory` of this process every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.start_rss = self.start_private = self.peak_rss = self.peak_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss, private = tree_memory()
        self.peak_rss, self.peak_private = max(self.peak_rss, rss), max(self.peak_private, private)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self.start_rss, self.start_private = tree_memory()
        self.peak_rss, self.peak_private = self.start_rss, self.start_private
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, float]:
        return {"start_rss_mb": self.start_rss / MB, "peak_rss_mb": self.peak_rss / MB,
                "start_private_mb": self.start_private / MB, "peak_private_mb": self.peak_private / MB}


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import monai
    import numpy
    import timm
    import torch
    import torchio

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "monai": monai.__version__,
        "torchio": torchio.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


# --------------------------------------------------------------------------- results
def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> dict:
    return {"title": title, "columns": list(columns), "rows": [list(row) for row in rows], "notes": list(notes)}


def target(description: str, value: float | None, goal: str, met: bool | None) -> dict:
    """A target check; ``met`` None = could not be measured."""
    return {"target": description, "value": value, "goal": goal, "met": met}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0 or math.isnan(denominator):
        return None
    return numerator / denominator


def format_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def markdown_table(spec: Mapping[str, Any]) -> str:
    lines = [f"**{spec['title']}**", "", "| " + " | ".join(spec["columns"]) + " |",
             "|" + "|".join("---" for _ in spec["columns"]) + "|"]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in spec["rows"]]
    lines += [""] + [f"- {note}" for note in spec.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def markdown_report(results: Mapping[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# lightning-mim benchmarks",
        "",
        f"Run {machine['date']} ({results['mode']} mode, {results['duration_s'] / 60:.1f} min) on {machine['cpu']}, "
        f"{machine['logical_cores']} logical cores, {machine['ram_gb']} GB RAM; torch {machine['torch']} "
        f"({machine['torch_threads']} threads), MONAI {machine['monai']}, TorchIO {machine['torchio']}, "
        f"timm {machine['timm']}. Load average (1/5/15 min) at start {machine['load_average']}, "
        f"at end {results['load_average_end']}.",
        "",
    ]
    if results.get("warning"):
        lines += [f"> **{results['warning']}**", ""]
    checks = [t for section in results["sections"].values() for t in section.get("targets", [])]
    if checks:
        lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for check in checks:
            met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
            lines.append(f"| {check['target']} | {format_cell(check['value'])} | {check['goal']} | {met} |")
        lines.append("")
    for name, section in results["sections"].items():
        lines += [f"## {section.get('title', name)}", ""]
        if section.get("error"):
            lines += ["```", section["error"].strip()[-2000:], "```", ""]
        for spec in section.get("tables", []):
            lines += [markdown_table(spec)]
        lines += [f"- {note}" for note in section.get("notes", [])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_results(results: Mapping[str, Any], folder: Path = RESULTS_DIR, stem: str = "latest") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown_report(results))
    return json_path, md_path
