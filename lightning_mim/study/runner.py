"""``python -m lightning_mim study``: does pre-training pay off? Every method against scratch, under one budget.

For each method: pre-train on the unlabelled pool (its encoder is exported at the end), then run
evaluation arms with the pre-trained encoder and with random initialisation of the *same* network
(same constructor arguments, ROI, data, seed, steps):

* ``probe``: encoder learning rate held at 0 (``freeze_encoder_epochs``), decoder/head trained;
* ``finetune``: everything trained, at each labelled-case budget;

each for every seed (the seed picks the labelled cases, the patch stream and the initialisation
of the new layers; pre-training is shared across seeds). Every arm is an ordinary
``python -m lightning_mim fit`` + ``test`` run, run in this process; its exact command lines are
written to ``<arm>/command.sh`` so a user can rerun any arm alone. An arm's ``result.json`` holds its
full configuration: a re-run reuses arms whose configuration is unchanged and recomputes the rest.
Arms whose configuration is identical (scratch arms of methods sharing a network) run once.

Order: every pre-training first, then the probe of every method, then each budget in turn, so an
interrupted study already holds complete evaluations. Results (:mod:`.report`): ``study.md``, ``study.csv``, ``study.json`` and ``label_efficiency.png``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lightning_mim.recipes import find_recipe

#: The study's own configs, as shipped recipe names (lightning_mim.recipes finds them installed or in a checkout).
STUDY_RECIPES = "study"
#: method name → its recipe in experiments/ (the study layers experiments/study/pretrain/<name>.yaml on top).
METHOD_RECIPES = {
    "mae3d": "mae.yaml",
    "simmim3d": "simmim.yaml",
    "smit": "smit.yaml",
    "selfmedhpm": "selfmedhpm.yaml",
    "anatomask": "anatomask.yaml",
    "hybridmim_swin": "hybridmim_swin.yaml",
    "hybridmim_unet": "hybridmim_unet.yaml",
    "swinunetr_ssl": "swinunetr_ssl.yaml",
    "voco": "voco.yaml",
    "simclr": "simclr.yaml",
    "models_genesis": "models_genesis.yaml",
    "volume_fusion": "volume_fusion.yaml",
    "dinov2": "dinov2.yaml",
}
RESULT_FILE = "result.json"
#: Encoder learning rate held at 0 for this many epochs = for the whole probe run.
PROBE_FREEZE_EPOCHS = 1.0e9


@dataclass
class Arm:
    """One run of the study: its kind, labels, configuration (the reuse key) and folder."""

    kind: str  # "pretrain", "probe" or "finetune"
    method: str  # pre-training method, or "scratch"
    network: str = ""
    budget: int | None = None
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path()
    encoder: str | None = None  # the pre-trained file of a pre-trained evaluation arm (its checksum is in config)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        if self.kind == "pretrain":
            return f"pre-train {self.method}"
        budget = f", {self.budget} labelled" if self.budget else ""
        return f"{self.kind} {self.method} ({self.network}{budget}, seed {self.seed})"


def _file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _flags(prefix: str, settings: dict[str, Any] | None) -> list[str]:
    """``--prefix.key value`` pairs; non-string values as JSON."""
    out = []
    for key, value in (settings or {}).items():
        out += [f"--{prefix}.{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


class NotFinished(RuntimeError):
    """``--report_only``: an arm has no result yet (reported as missing, not run)."""


class Progress:
    """Per-arm progress lines: phase, arm, elapsed time and an ETA from the mean time of finished arms per kind.

    A kind with no finished arm yet is estimated from the arms most like it: an evaluation kind (probe,
    fine-tuning: one short fit + test each) from the other evaluation kind, before any pre-training mean,
    which is minutes per arm and would inflate the estimate several-fold.
    """

    def __init__(self, arms: list[Arm]) -> None:
        self.total = {kind: sum(a.kind == kind for a in arms) for kind in ("pretrain", "probe", "finetune")}
        self.done = dict.fromkeys(self.total, 0)
        self.seconds: dict[str, list[float]] = {kind: [] for kind in self.total}
        self.start = time.monotonic()

    def eta(self) -> str:
        measured = [s for values in self.seconds.values() for s in values]
        if not measured:
            return "ETA: after the first arm"
        evaluations = self.seconds["probe"] + self.seconds["finetune"]
        remaining = 0.0
        for kind, total in self.total.items():
            like = self.seconds[kind] or (evaluations if kind != "pretrain" else []) or measured
            remaining += (total - self.done[kind]) * sum(like) / len(like)
        return f"ETA {remaining / 60:.1f} min"

    def line(self, arm: Arm, status: str, seconds: float | None = None) -> str:
        if seconds is not None:
            self.done[arm.kind] += 1
            if status == "done":
                self.seconds[arm.kind].append(seconds)
        count = f"{self.done[arm.kind]}/{self.total[arm.kind]}"
        took = f" in {seconds:.0f} s" if seconds is not None and status == "done" else ""
        elapsed = (time.monotonic() - self.start) / 60
        return f"[study {elapsed:5.1f} min] {arm.kind:8s} {count:>7s} {arm.describe()}: {status}{took} — {self.eta()}"


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Library chatter (Lightning's info lines, warnings, test tables) goes to the arm's log, not the console."""
    if not enabled:
        yield io.StringIO()
        return
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_mim")]
    levels = [logger.level for logger in loggers]
    handler = logging.StreamHandler(buffer)
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        logging.getLogger().removeHandler(handler)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_cli(args: list[str]) -> None:
    from lightning_mim.cli import main as cli_main

    code = cli_main(args)
    if code:
        raise RuntimeError(f"command failed with exit code {code}: python -m lightning_mim {' '.join(args)}")


def fit_then_test(fit_args: list[str]) -> None:
    """``fit`` through the real CLI, then ``test`` of its final weights on the same Trainer and data module.

    The same as the arm's ``test --ckpt_path <run>/checkpoints/last.ckpt`` command (last.ckpt holds those
    weights), without parsing the configuration and setting up the data a second time.
    """
    from lightning_mim.cli import MIMCLI, close_wandb_run

    try:
        cli = MIMCLI(args=fit_args)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    finally:
        close_wandb_run()


@dataclass
class StudySettings:
    """Everything that defines a study (the parsed ``study`` options)."""

    output: Path
    methods: list[str]
    seeds: list[int]
    budgets: list[int]
    probe_budget: int | None
    pretrain_steps: int
    finetune_steps: int
    probe_steps: int
    nsd_tolerance_mm: float
    num_classes: int
    preprocessing: dict[str, Any]
    roi_by_network: dict[str, list[int]]
    network_kwargs: dict[str, dict[str, Any]]
    unlabelled: dict[str, Any]
    labelled: dict[str, Any]
    wandb: bool
    name: str
    report_only: bool = False
    report_folder: str = "report"


class Study:
    """Builds the arms of a study, runs the missing ones, and writes the report."""

    def __init__(self, settings: StudySettings, echo=None) -> None:
        self.settings = settings
        self.echo = echo or _echo
        self.root = Path(settings.output).expanduser()
        self.arms: dict[str, Arm] = {}

    # ------------------------------------------------------------------ arms
    def _logger_flags(self, arm_id: str, folder: Path) -> list[str]:
        if not self.settings.wandb:
            return ["--trainer.logger", "false", "--trainer.default_root_dir", str(folder)]
        return ["--trainer.logger", "lightning_mim.loggers.MIMWandbLogger", "--trainer.logger.init_args.save_dir",
                str(folder), "--trainer.logger.init_args.id", arm_id, "--trainer.logger.init_args.group",
                self.settings.name, "--trainer.logger.init_args.offline", "true", "--auto_resume", "false"]

    def run_folder(self, arm: Arm) -> Path:
        """Where the arm's run writes (checkpoints, encoder, test metrics)."""
        return arm.folder / "lightning-mim" / f"{arm.folder.name}" if self.settings.wandb else arm.folder

    def pretrain_arm(self, method: str) -> Arm:
        s = self.settings
        configs = [METHOD_RECIPES[method], f"{STUDY_RECIPES}/pretrain/common.yaml", f"{STUDY_RECIPES}/pretrain/{method}.yaml"]
        config = {"kind": "pretrain", "method": method, "configs": {name: _file_digest(find_recipe(name)) for name in configs},
                  "data": s.unlabelled, "data_files": self._source_digests(s.unlabelled), "preprocessing": s.preprocessing,
                  "steps": s.pretrain_steps, "seed": 0}
        arm = Arm("pretrain", method, config=config)
        arm.folder = self.root / "pretrain" / f"{method}-{arm.key}"
        return arm

    def pretrain_args(self, arm: Arm) -> list[str]:
        s = self.settings
        configs = [a for name in arm.config["configs"] for a in ("--config", str(find_recipe(name)))]
        return ["fit", *configs, *_flags("data.init_args", s.unlabelled),
                "--data.init_args.preprocessing", json.dumps(s.preprocessing),
                "--seed_everything", "0", "--trainer.max_steps", str(s.pretrain_steps),
                *self._logger_flags(f"pretrain-{arm.method}", arm.folder)]

    def evaluation_arm(self, kind: str, method: str, encoder: Path, budget: int | None, seed: int, pretrained: bool) -> Arm:
        from lightning_mim.segmentation.networks import without_defaults
        from lightning_mim.segmentation.weights import read_pretrained

        s = self.settings
        file = read_pretrained(encoder)
        network = file.target
        kwargs = without_defaults(network, {**s.network_kwargs.get(network, {}), **file.network_kwargs})
        roi = s.roi_by_network.get(network, [32, 32, 32])
        config = {"kind": kind, "network": network, "network_kwargs": kwargs, "roi": roi, "budget": budget, "seed": seed,
                  "steps": s.probe_steps if kind == "probe" else s.finetune_steps, "data": s.labelled,
                  "data_files": self._source_digests(s.labelled), "preprocessing": s.preprocessing,
                  "num_classes": s.num_classes, "nsd_tolerance_mm": s.nsd_tolerance_mm,
                  "config": _file_digest(find_recipe(f"{STUDY_RECIPES}/finetune.yaml")),
                  # The weights' checksum, not the file's bytes (the file also records when it was written).
                  "encoder": file.meta["checksum"] if pretrained else None}
        arm = Arm(kind, method if pretrained else "scratch", network, budget, seed, config,
                  encoder=str(encoder) if pretrained else None)
        label = method if pretrained else f"scratch-{network}"
        arm.folder = self.root / kind / f"{label}-b{budget or 'all'}-s{seed}-{arm.key}"
        return arm

    def evaluation_args(self, arm: Arm) -> tuple[list[str], list[str]]:
        """(fit, test) command lines of an evaluation arm."""
        s, config = self.settings, arm.config
        model = ["--model.init_args.num_classes", str(s.num_classes),
                 "--model.init_args.network", config["network"],
                 "--model.init_args.network_kwargs", json.dumps(config["network_kwargs"]),
                 "--model.init_args.roi_size", json.dumps(config["roi"]),
                 "--model.init_args.test_nsd_tolerance", str(s.nsd_tolerance_mm)]
        if arm.encoder:
            model += ["--model.init_args.pretrained", arm.encoder, "--model.init_args.method_name", arm.method]
        else:
            model += ["--model.init_args.method_name", "scratch"]
        if arm.kind == "probe":
            model += ["--model.init_args.freeze_encoder_epochs", str(PROBE_FREEZE_EPOCHS)]
        data = [*_flags("data.init_args", s.labelled), "--data.init_args.preprocessing", json.dumps(s.preprocessing),
                "--data.init_args.patch_size", json.dumps(config["roi"]), "--data.init_args.seed", str(arm.seed),
                *(["--data.init_args.num_labelled", str(arm.budget)] if arm.budget else [])]
        common = ["--config", str(find_recipe(f"{STUDY_RECIPES}/finetune.yaml")), *model, *data, "--seed_everything", str(arm.seed)]
        where = self._logger_flags(arm.folder.name, arm.folder)
        fit = ["fit", *common, "--trainer.max_steps", str(config["steps"]), *where]
        checkpoint = self.run_folder(arm) / "checkpoints" / "last.ckpt"
        test = ["test", *common, *where, "--ckpt_path", str(checkpoint), "--verbose", "false"]
        return fit, test

    def _source_digests(self, source: dict[str, Any]) -> dict[str, str]:
        """Content hashes of the list files of a data source, so a changed pool invalidates its arms."""
        return {k: _file_digest(v) for k, v in source.items() if k in ("datalist", "csv") and Path(v).is_file()}

    # ------------------------------------------------------------------ running
    @staticmethod
    def finished(arm: Arm) -> dict[str, Any] | None:
        try:
            result = json.loads((arm.folder / RESULT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return result if result.get("key") == arm.key else None

    def execute(self, arm: Arm, commands: list[list[str]], progress: Progress, collect) -> dict[str, Any]:
        reused = self.finished(arm)
        if reused is not None:
            self.echo(progress.line(arm, "reused (finished earlier)", 0.0))
            return reused
        if self.settings.report_only:
            raise NotFinished(f"{arm.describe()} has not run yet ({arm.folder})")
        shutil.rmtree(arm.folder, ignore_errors=True)  # an unfinished run starts over: nothing half-reused
        arm.folder.mkdir(parents=True)
        script = "\n".join("python -m lightning_mim " + " ".join(_quote(a) for a in command) for command in commands)
        (arm.folder / "command.sh").write_text("#!/bin/sh\n# One arm of the study; run from the repository root.\nset -e\n"
                                               + script + "\n")
        self.echo(progress.line(arm, "running"))
        start = time.monotonic()
        with quiet() as log:
            try:
                if arm.kind == "pretrain":
                    run_cli(commands[0])
                else:
                    fit_then_test(commands[0])
            except BaseException:
                import traceback

                log.write(traceback.format_exc())
                raise
            finally:
                (arm.folder / "log.txt").write_text(log.getvalue())
        result = {"key": arm.key, "config": arm.config, "kind": arm.kind, "method": arm.method, "network": arm.network,
                  "budget": arm.budget, "seed": arm.seed, "seconds": round(time.monotonic() - start, 1), **collect(arm)}
        (arm.folder / RESULT_FILE).write_text(json.dumps(result, indent=1))
        self.echo(progress.line(arm, "done", time.monotonic() - start))
        return result

    def _collect_pretrain(self, arm: Arm) -> dict[str, Any]:
        encoder = self.run_folder(arm) / "encoder.pt"
        if not encoder.is_file():
            raise RuntimeError(f"pre-training {arm.method} wrote no encoder ({encoder}); see {arm.folder / 'log.txt'}")
        return {"encoder": str(encoder)}

    def _collect_evaluation(self, arm: Arm) -> dict[str, Any]:
        from lightning_mim.segmentation.evaluation import read_metrics_csv
        from lightning_mim.segmentation.module import TEST_CSV

        rows = read_metrics_csv(self.run_folder(arm) / TEST_CSV)
        return {"rows": [{k: r[k] for k in ("case_id", "organ", "dice", "hd95", "nsd")} for r in rows]}

    def run(self) -> list[dict[str, Any]]:
        """Every arm (reusing finished ones), method by method; returns the evaluation results."""
        s = self.settings
        pretrain_arms = [self.pretrain_arm(m) for m in s.methods]
        kinds = [("probe", s.probe_budget)] + [("finetune", b) for b in s.budgets]
        per_method = 1 + 2 * len(kinds) * len(s.seeds)
        # Arm counts for the progress line (scratch arms shared by methods are counted once each time they recur).
        planned = pretrain_arms + [Arm(k, "") for _ in s.methods for k, _ in kinds for _ in s.seeds for _ in range(2)]
        progress = Progress(planned)
        self.echo(f"[study] {len(s.methods)} method(s), {per_method} arms each (1 pre-training, probe + "
                  f"{len(s.budgets)} budget(s) × {len(s.seeds)} seed(s) × pre-trained/scratch); output {self.root}")
        results: dict[str, dict[str, Any]] = {}
        self.failures = []
        encoders: dict[str, Path] = {}
        for pretrain in pretrain_arms:  # phase 1: pre-training; then one phase per evaluation, all methods each
            try:
                encoders[pretrain.method] = Path(self.execute(pretrain, [self.pretrain_args(pretrain)], progress,
                                                              self._collect_pretrain)["encoder"])
            except Exception as error:  # one method failing must not cost the others their results
                self._failed(pretrain, error)
        for kind, budget in kinds:
            for method, encoder in encoders.items():
                for seed in s.seeds:
                    for pretrained in (True, False):
                        arm = self.evaluation_arm(kind, method, encoder, budget, seed, pretrained)
                        if arm.key in results:  # a scratch arm another method already ran
                            progress.line(arm, "shared", 0.0)
                            results[f"{arm.key}/{method}"] = {**results[arm.key], "for_method": method}
                            continue
                        fit, test = self.evaluation_args(arm)
                        try:
                            result = self.execute(arm, [fit, test], progress, self._collect_evaluation)
                        except Exception as error:
                            self._failed(arm, error)
                            continue
                        results[arm.key] = {**result, "for_method": method}
        return list(results.values())

    def _failed(self, arm: Arm, error: Exception) -> None:
        if isinstance(error, NotFinished):
            self.failures.append({"arm": arm.describe(), "folder": str(arm.folder), "error": "not run yet"})
            return
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        self.failures.append({"arm": arm.describe(), "folder": str(arm.folder), "error": message})
        self.echo(f"[study] FAILED {arm.describe()}: {message} (log: {arm.folder / 'log.txt'})")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


#: --fast: a smoke test of the whole path (tiny pools, a couple of steps, two seeds).
FAST = {"methods": ["mae3d"], "seeds": [0, 1], "budgets": [1], "probe_budget": 1, "pretrain_steps": 2,
        "finetune_steps": 2, "probe_steps": 2,
        "phantoms": {"unlabelled": 2, "labelled": 2, "test": 2, "shape": [32, 32, 32], "spacing": [5.0, 5.0, 5.0], "seed": 0}}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lightning_mim study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="study YAML (default: experiments/study/phantoms.yaml)")
    parser.add_argument("--name", type=str, default="study", help="study name (W&B group, report title)")
    parser.add_argument("--output", type=str, default="runs/study", help="folder of all arms and the report")
    parser.add_argument("--methods", type=list[str], default=list(METHOD_RECIPES), help=f"any of {list(METHOD_RECIPES)}")
    parser.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="evaluation seeds (>= 3 for the published table)")
    parser.add_argument("--budgets", type=list[int], default=[1, 2, 4], help="labelled training cases per fine-tuning arm")
    parser.add_argument("--probe_budget", type=int | None, default=None, help="labelled cases of the probe (None: all)")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--finetune_steps", type=int, default=60)
    parser.add_argument("--probe_steps", type=int, default=60)
    parser.add_argument("--nsd_tolerance_mm", type=float, default=5.0, help="tolerance of the normalised surface Dice")
    parser.add_argument("--num_classes", type=int, default=9, help="classes of the labelled data, background included")
    parser.add_argument("--preprocessing", type=dict, default={}, help="Preprocessing settings of every arm")
    parser.add_argument("--roi_by_network", type=dict, default={}, help="fine-tuning ROI per network (default 32³)")
    parser.add_argument("--network_kwargs", type=dict, default={},
                        help="decoder settings per network, the same for pre-trained and scratch arms")
    parser.add_argument("--phantoms", type=dict, default={"unlabelled": 64, "labelled": 8, "test": 6, "shape": [48, 48, 32],
                                                          "spacing": [6.5, 6.5, 5.0], "seed": 0},
                        help="the embedded phantom pools (data_modules.phantoms.ensure_phantom_pools arguments)")
    parser.add_argument("--phantom_root", type=str | None, default=None, help="where the phantom pools are generated")
    parser.add_argument("--unlabelled", type=dict | None, default=None,
                        help="your pre-training source: PretrainDataModule arguments, e.g. {folder: /data/ct}")
    parser.add_argument("--labelled", type=dict | None, default=None,
                        help="your labelled source with its test split: SegmentationDataModule arguments, e.g. "
                             "{datalist: dataset.json} (its validation section is the test split) or {folder: ...}")
    parser.add_argument("--results", type=str | None, default=None,
                        help="also copy the report here as study-<name>.{md,csv,json,png} (e.g. benchmarks/results)")
    parser.add_argument("--wandb", type=bool, default=False, help="log every arm to W&B (offline), one group per study")
    parser.add_argument("--report_folder", type=str, default="report",
                        help="the report's folder inside --output (studies that share an output folder need their own)")
    parser.add_argument("--report_only", type=bool, default=False,
                        help="write the report from the arms finished so far, run nothing (missing arms are listed)")
    parser.add_argument("--fast", type=bool, default=False, help="smoke test: tiny pools, 2 steps, 1 method, 2 seeds")
    return parser


def settings_from_args(args) -> StudySettings:
    options = {k: args[k] for k in ("methods", "seeds", "budgets", "probe_budget", "pretrain_steps", "finetune_steps",
                                    "probe_steps", "phantoms")}
    if args.fast:
        options.update(FAST)
    unknown = [m for m in options["methods"] if m not in METHOD_RECIPES]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {list(METHOD_RECIPES)}")
    if not options["seeds"] or not options["budgets"] or min(options["budgets"]) < 1:
        raise ValueError("--seeds and --budgets need at least one value each; budgets are >= 1 labelled cases")
    if bool(args.unlabelled) != bool(args.labelled):
        raise ValueError("give both --unlabelled and --labelled for your own data, or neither for the phantoms")
    unlabelled, labelled = args.unlabelled, args.labelled
    if not unlabelled:
        from data_modules.phantoms import ensure_phantom_pools

        pools = ensure_phantom_pools(args.phantom_root, **options["phantoms"])
        unlabelled = {"datalist": str(pools["unlabelled"])}
        labelled = {"datalist": str(pools["labelled"])}
    default_preprocessing = {"modality": "ct", "orientation": "RAS", "spacing": None, "intensity": "window",
                             "window": [-175, 250], "output_range": [0, 1], "crop_foreground": False}
    return StudySettings(
        output=Path(args.output), methods=options["methods"], seeds=options["seeds"], budgets=options["budgets"],
        probe_budget=options["probe_budget"], pretrain_steps=options["pretrain_steps"],
        finetune_steps=options["finetune_steps"], probe_steps=options["probe_steps"],
        nsd_tolerance_mm=args.nsd_tolerance_mm, num_classes=args.num_classes,
        preprocessing=dict(args.preprocessing) or default_preprocessing, roi_by_network=dict(args.roi_by_network),
        network_kwargs=dict(args.network_kwargs), unlabelled=dict(unlabelled), labelled=dict(labelled),
        wandb=args.wandb, name=args.name, report_only=args.report_only, report_folder=args.report_folder)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _echo(text: str) -> None:
    print(text, flush=True)  # progress must show at once, also when stdout is a file


def run_study(settings: StudySettings, results_folder: str | None = None, echo=_echo) -> dict[str, Path]:
    """Run (or resume) a study and write its report into ``<output>/<report_folder>`` (and ``results_folder``)."""
    import platform
    import subprocess

    from lightning_mim.study.report import build_table, write_report

    start = time.monotonic()
    study = Study(settings, echo)
    results = study.run()
    table = build_table(results, settings.seeds)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    header = {"name": settings.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": f"{_cpu_model() or platform.machine()}, {os.cpu_count()} CPU cores",
              "methods": ", ".join(settings.methods), "seeds": settings.seeds, "budgets": settings.budgets,
              "probe_budget": settings.probe_budget or "all", "steps": f"pre-training {settings.pretrain_steps}, "
              f"fine-tuning {settings.finetune_steps}, probe {settings.probe_steps}",
              "nsd_tolerance_mm": settings.nsd_tolerance_mm,
              "arm_seconds": round(sum(r.get("seconds", 0.0) for r in results), 1),
              "wall_seconds_this_invocation": round(time.monotonic() - start, 1),
              "failed_or_missing_arms": "; ".join(f"{f['arm']}: {f['error']}" for f in study.failures) or "none"}
    paths = write_report(table, header, study.root / settings.report_folder)
    if results_folder:
        stem = f"study-{settings.name}"
        copies = write_report(table, header, Path(results_folder), stem)
        paths = {**paths, **{f"results_{k}": v for k, v in copies.items()}}
    if settings.wandb:
        _log_report_to_wandb(table, paths, settings)
    echo("\n" + paths["markdown"].read_text().split("## Dice per organ")[0])
    echo(f"[study] report: {paths['markdown']}, {paths['csv']}, {paths['json']}, {paths['plot']}")
    return paths


def _log_report_to_wandb(table, paths: dict[str, Path], settings: StudySettings) -> None:
    import wandb

    with quiet():
        run = wandb.init(project="lightning-mim", group=settings.name, name=f"{settings.name}-report", job_type="study",
                         mode="offline", dir=str(Path(settings.output)), reinit=True)
        columns = list(table[0]) if table else []
        run.log({"study/table": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table]),
                 "study/label_efficiency": wandb.Image(str(paths["plot"]))})
        run.finish()


def main(argv: list[str]) -> int:
    parser = build_parser()
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(find_recipe(f"{STUDY_RECIPES}/phantoms.yaml")), *argv]
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    settings = settings_from_args(args)
    run_study(settings, args.results)
    return 0
