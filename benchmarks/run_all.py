"""Run every benchmark and write ``benchmarks/results/latest.{json,md}`` (``make bench``).

    python -m benchmarks.run_all             # the full set (~20 min on 2 cores)
    python -m benchmarks.run_all --quick     # tiny sizes, to check the scripts (writes quick.{json,md})
    python -m benchmarks.run_all --sections methods evaluation
    python -m benchmarks.run_all --sections data_path methods --methods MAE-3D --output corpus

Timings are only meaningful on an otherwise idle machine: the load average is recorded at the start
and the end, and a warning is written into the results when the machine was busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from typing import Any

from benchmarks import data_path, evaluation, methods, probe, scaling
from benchmarks.common import RESULTS_DIR, machine_info, write_results

SECTIONS = ("data_path", "methods", "evaluation", "scaling", "probe")
BUSY_LOAD_PER_CORE = 1.25


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and fewer points (checks the scripts)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--methods", nargs="+", default=[], metavar="NAME",
                        help="only these rows of the methods section, as its table names them (e.g. MAE-3D 'SMIT')")
    parser.add_argument("--output", default=None, help="results file stem (default: latest, or quick with --quick)")
    args = parser.parse_args(argv)
    quick = args.quick
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    machine = machine_info()
    log(f"machine: {machine['cpu']}, {machine['logical_cores']} cores, load {machine['load_average']}")
    sections: dict[str, Any] = {}

    def attempt(name: str, function) -> None:
        if name not in args.sections:
            return
        try:
            sections[name] = function()
        except Exception:  # noqa: BLE001 - record the failure and keep going with the other sections
            sections[name] = {"title": name, "error": traceback.format_exc()}
            log(f"{name} failed:\n{sections[name]['error']}")

    attempt("data_path", lambda: data_path.run(
        data_path.DataBenchConfig.quick() if quick else data_path.DataBenchConfig.full(), log=log))
    method_config = methods.MethodBenchConfig.quick() if quick else methods.MethodBenchConfig.full()
    attempt("methods", lambda: methods.run(dataclasses.replace(method_config, only=tuple(args.methods)),
                                           quick=quick, log=log))
    attempt("evaluation", lambda: evaluation.run(
        evaluation.EvalBenchConfig.quick() if quick else evaluation.EvalBenchConfig.full(), log=log))
    attempt("scaling", lambda: scaling.run(
        scaling.ScalingConfig.quick() if quick else scaling.ScalingConfig.full(), sections.get("methods"),
        quick=quick, log=log))
    attempt("probe", lambda: probe.run(
        probe.ProbeBenchConfig.quick() if quick else probe.ProbeBenchConfig.full(), log=log))

    end_load = [round(v, 2) for v in os.getloadavg()]
    busy = max(machine["load_average"][0], end_load[0]) > BUSY_LOAD_PER_CORE * (machine["logical_cores"] or 1)
    results = {
        "machine": machine,
        "mode": "quick" if quick else "full",
        "duration_s": time.perf_counter() - start,
        "load_average_end": end_load,
        "warning": ("The machine was busy (load average above "
                    f"{BUSY_LOAD_PER_CORE:g} per core): timings are not reliable, rerun on an idle machine."
                    if busy else None),
        "sections": sections,
    }
    json_path, md_path = write_results(results, RESULTS_DIR, args.output or ("quick" if quick else "latest"))
    log(f"wrote {json_path} and {md_path}")
    failed = [name for name, section in sections.items() if section.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
