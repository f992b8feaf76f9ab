"""Why does a method not beat scratch in the study? Export/load check, loss curves and probe over steps.

Everything runs at the study's own configuration (``experiments/study/phantoms.yaml`` and the method's
``experiments/study/pretrain/<method>.yaml``), built by :class:`lightning_mim.study.runner.Study` itself,
so the commands are the study's; only the step count, the logger-free recorders and the online probe are
added:

1. **pre-training curves**: every training-step loss and scalar (component losses, collapse monitors)
   for each ``--steps`` run (the cosine schedule spans the run, so a 100-step run is the study's
   and a 400-step run is not its prefix), with the online segmentation probe
   (:class:`~lightning_mim.callbacks.probe.SegmentationProbe`) before the first step and every
   ``--probe_every`` steps, on the study's labelled pool (fit on its training cases, Dice on its test
   split);
2. **export → load** (``--check_loading``): the encoder the first run exported is loaded by the
   study's probe arm and its smallest-budget fine-tuning arm (seed 0, the study's own fit command
   lines); tensor by tensor, the network at the first step must equal the file, differ from a fresh
   random network, and — probe arm only — still equal it after training.

``python -m benchmarks.diagnose_study_method --methods smit hybridmim_unet --steps 100 400 --output
/tmp/diagnosis`` writes ``diagnosis.json`` there and prints Markdown tables. CPU minutes per method.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lightning_mim.recipes import find_recipe

STUDY_CONFIG = "study/phantoms.yaml"


class StepRecorder(L.Callback):
    """Every training step's logged ``train/*`` values (the study runs without a logger), and the weights at the start."""

    last: StepRecorder | None = None

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.initial_state: dict[str, torch.Tensor] = {}
        StepRecorder.last = self

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        row: dict[str, float] = {"step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train/") and not key.endswith("_epoch"):
                row[key.removeprefix("train/").removesuffix("_step")] = float(value)
        self.rows.append(row)


class NetworkSnapshot(L.Callback):
    """The segmentation network's weights when training starts and when it ends."""

    last: NetworkSnapshot | None = None

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        NetworkSnapshot.last = self

    @staticmethod
    def _copy(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.network.state_dict().items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self._copy(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = self._copy(pl_module)


def study(output: Path, steps: int, extra: list[str] | None = None):
    """The study's runner; ``extra``: further ``study`` arguments (e.g. other ``--phantoms``)."""
    from lightning_mim.study.runner import Study, build_parser, settings_from_args

    args = build_parser().parse_args(["--config", str(find_recipe(STUDY_CONFIG)), "--output", str(output),
                                      "--pretrain_steps", str(steps), *(extra or [])])
    return Study(settings_from_args(args), echo=lambda text: None)


def _mean_cosine_between_samples(values: torch.Tensor) -> float:
    unit = F.normalize(values.flatten(1).float(), dim=-1)
    similarity, count = unit @ unit.T, unit.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * count - count))


def _swapped_bottleneck_l1(images: torch.Tensor, encoder, mask_ratio: float, bottleneck_of, decode,
                           masks: int) -> dict[str, float]:
    """Masked-voxel L1 of ``decode`` fed each sample's own bottleneck, the batch mean's and another sample's.

    ``bottleneck_of(cells)`` encodes ``images`` under a cell mask. The masks are drawn from seed 0 and the
    global RNG is restored, so the check neither varies between calls nor disturbs the training stream.
    """
    from lightning_mim.losses.reconstruction import masked_voxel_l1
    from lightning_mim.masking.grid import voxel_mask
    from lightning_mim.masking.random import random_cell_mask

    losses: dict[str, list[float]] = {"mip_l1_own": [], "mip_l1_batch_mean": [], "mip_l1_other_sample": []}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    for _ in range(masks):
        cells = random_cell_mask(images.shape[0], encoder.cell_grid, mask_ratio, device=images.device)
        bottleneck = bottleneck_of(cells)
        voxels = voxel_mask(cells, encoder.mask_cell)
        for name, code in (("mip_l1_own", bottleneck),
                           ("mip_l1_batch_mean", bottleneck.mean(dim=0, keepdim=True).expand_as(bottleneck)),
                           ("mip_l1_other_sample", bottleneck.roll(1, dims=0))):
            losses[name].append(float(masked_voxel_l1(decode(code), images, voxels)))
    torch.random.set_rng_state(generator_state)
    return {name: sum(values) / len(values) for name, values in losses.items()}


def smit_input_dependence(module, images: torch.Tensor, masks: int = 5) -> dict[str, float]:
    """Does SMIT's student still tell inputs apart (eval mode, no gradients)?

    Mean cosine similarity between samples of the global token and of the cls head's normalised
    bottleneck; the spread of the cls logits over samples and over prototypes (DINO collapse: ~0
    over samples); and the masked-voxel L1 of the MIP head fed with each sample's own bottleneck,
    with the batch-mean bottleneck and with another sample's (equal values: the reconstruction does
    not use the input).
    """
    from lightning_mim.backbones.compositions import TAP_STAGE

    module = module.eval()
    student, hp = module.student, module.hparams
    with torch.no_grad():
        features = student.encode(images)
        output = student.decode(images, features)
        global_token = student.tap_norm(features[TAP_STAGE].flatten(2).transpose(1, 2)).mean(dim=1)
        head_bottleneck = F.normalize(student.cls_head.mlp(global_token), dim=-1)
        losses = _swapped_bottleneck_l1(
            images, module.encoder, hp.mask_ratio,
            lambda cells: module.encoder.proj_out(student(images, module.encoder.token_mask(cells)).bottleneck,
                                                  hp.normalize_bottleneck),
            module.mip_head, masks)
    return {"global_token_cosine": _mean_cosine_between_samples(global_token),
            "head_bottleneck_cosine": _mean_cosine_between_samples(head_bottleneck),
            "cls_logit_std_over_samples": float(output.cls_logits.std(dim=0).mean()),
            "cls_logit_std_over_prototypes": float(output.cls_logits.std(dim=1).mean()),
            **losses}


def simmim_input_dependence(module, images: torch.Tensor, masks: int = 5) -> dict[str, float]:
    """SimMIM-3D's counterpart of :func:`smit_input_dependence` (same Swin encoder and linear decoder).

    Mean cosine similarity between samples of the mean-pooled bottleneck, and the masked-voxel L1 of
    the decoder fed each sample's own bottleneck, the batch mean's and another sample's.
    """
    module = module.eval()
    encoder = module.encoder
    with torch.no_grad():
        pooled = encoder(images, None, normalize=False)[-1].flatten(2).mean(dim=2)
        losses = _swapped_bottleneck_l1(
            images, encoder, module.mask_ratio,
            lambda cells: encoder.proj_out(encoder(images, encoder.token_mask(cells), normalize=False)[-1],
                                           module.normalize_bottleneck),
            module.decoder, masks)
    return {"global_token_cosine": _mean_cosine_between_samples(pooled), **losses}


INPUT_DEPENDENCE = {"smit": smit_input_dependence, "simmim3d": simmim_input_dependence}


def pretrain(method: str, steps: int, probe_every: int, output: Path, seed: int = 0,
             overrides: list[str] | None = None, study_args: list[str] | None = None) -> dict[str, Any]:
    """The study's pre-training of ``method`` for ``steps`` steps (its seed 0 unless ``seed``), recorded.

    ``overrides`` are extra ``fit`` arguments appended to the study's (e.g. a warm-up to test).
    Returns the curves, the probe history and the encoder's path.
    """
    from lightning_mim.callbacks.probe import SegmentationProbe
    from lightning_mim.cli import MIMCLI

    runner = study(output, steps, study_args)
    arm = runner.pretrain_arm(method)
    arm.folder = output / f"pretrain-{method}-{steps}-seed{seed}{'-overridden' if overrides else ''}"
    probe_data = {"datalist": runner.settings.labelled["datalist"]}
    args = [*runner.pretrain_args(arm), "--seed_everything", str(seed), "--trainer.log_every_n_steps", "1",
            f"--trainer.callbacks+={__name__}.StepRecorder",
            "--trainer.callbacks+=lightning_mim.callbacks.probe.SegmentationProbe",
            "--trainer.callbacks.init_args.every_n_steps", str(probe_every),
            "--trainer.callbacks.init_args.fit_cases", str(runner.settings.probe_budget or 4),
            "--trainer.callbacks.init_args.eval_cases", "6",
            "--trainer.callbacks.init_args.max_cost_fraction", "1.0",
            "--trainer.callbacks.init_args.data", json.dumps(probe_data), *(overrides or [])]
    cli = MIMCLI(args=args)
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, SegmentationProbe))
    run = {"method": method, "steps": steps, "seed": seed, "overrides": overrides or [], "curve": StepRecorder.last.rows, "probe": probe.history,
           "encoder": str(runner.run_folder(arm) / "encoder.pt"), "command": " ".join(args)}
    check = INPUT_DEPENDENCE.get(method)
    if check is not None:  # on the probe's eval crops (the study's test cases, its preprocessing)
        images = probe._crops["eval"][0]
        initial = type(cli.model)(**{k: v for k, v in cli.model.hparams.items() if not k.startswith("_")})
        initial.load_state_dict(StepRecorder.last.initial_state)
        run["input_dependence"] = {"step 0": check(initial, images), f"step {steps}": check(cli.model, images)}
    return run


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def check_loading(method: str, encoder: Path, output: Path, study_args: list[str] | None = None) -> list[dict[str, Any]]:
    """The study's probe arm and 1-case fine-tuning arm (seed 0) on ``encoder``, compared tensor by tensor."""
    from lightning_mim.cli import MIMCLI
    from lightning_mim.segmentation.module import SegmentationModule
    from lightning_mim.segmentation.networks import network_spec
    from lightning_mim.segmentation.weights import read_encoder_file

    file = read_encoder_file(encoder)
    runner = study(output, 0, study_args)
    checks = []
    for kind, budget in (("probe", runner.settings.probe_budget), ("finetune", min(runner.settings.budgets))):
        arm = runner.evaluation_arm(kind, method, encoder, budget, 0, pretrained=True)
        arm.folder = output / f"{kind}-{method}"
        fit, _ = runner.evaluation_args(arm)
        cli = MIMCLI(args=[*fit, f"--trainer.callbacks+={__name__}.NetworkSnapshot"])
        snapshot, report = NetworkSnapshot.last, cli.model.load_report
        prefix = network_spec(arm.network).encoder_prefix
        fresh = SegmentationModule(num_classes=runner.settings.num_classes, network=arm.network,
                                   network_kwargs=arm.config["network_kwargs"], roi_size=arm.config["roi"]).network
        fresh_state = fresh.state_dict()
        keys = sorted(file.state_dict)
        encoder_keys = [k for k in snapshot.start if k.startswith(prefix)]
        checks.append({
            "method": method, "arm": kind, "network": arm.network, "budget": budget,
            "file_tensors": len(keys), "loaded": len(report.loaded), "missing": len(report.missing),
            "unexpected": len(report.unexpected), "mismatched": len(report.mismatched),
            "decoder_from_scratch": len(report.from_scratch),
            "network_encoder_tensors": len(encoder_keys),
            "encoder_tensors_not_in_file": sum(k not in file.state_dict for k in encoder_keys),
            "start_equals_file": sum(_same(snapshot.start[k], file.state_dict[k]) for k in keys),
            "fresh_init_equals_file": sum(_same(fresh_state[k], file.state_dict[k]) for k in keys),
            "end_equals_file_encoder": sum(_same(snapshot.end[k], file.state_dict[k]) for k in keys if k.startswith(prefix)),
            "end_equals_file_other": sum(_same(snapshot.end[k], file.state_dict[k]) for k in keys if not k.startswith(prefix)),
            "file_encoder_tensors": sum(k.startswith(prefix) for k in keys),
            "max_abs_change_encoder": max(float((snapshot.end[k] - file.state_dict[k]).abs().max()) for k in keys
                                          if k.startswith(prefix) and file.state_dict[k].is_floating_point()),
        })
    return checks


def curve_table(run: dict[str, Any], every: int) -> str:
    """Markdown: the mean of every recorded value over windows of ``every`` steps."""
    rows = run["curve"]
    names = [k for k in rows[-1] if k != "step"]
    lines = [f"| steps | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for start in range(0, len(rows), every):
        window = rows[start:start + every]
        means = [sum(r.get(n, math.nan) for r in window) / len(window) for n in names]
        lines.append(f"| {window[0]['step']}–{window[-1]['step']} | " + " | ".join(f"{m:.4g}" for m in means) + " |")
    return "\n".join(lines)


def probe_table(run: dict[str, Any]) -> str:
    organs = [k for k in run["probe"][0] if k.startswith("probe/dice/")]
    header = ["step", "mean Dice", *(k.rsplit("/", 1)[1] for k in organs)]
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    for row in run["probe"]:
        cells = [str(row["step"]), f"{row['probe/dice_mean']:.3f}", *(f"{row.get(k, math.nan):.3f}" for k in organs)]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["smit", "hybridmim_unet"])
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 400], help="one pre-training run per count")
    parser.add_argument("--probe_every", nargs="+", type=int, default=[25, 50], help="probe interval per --steps run")
    parser.add_argument("--output", type=Path, required=True, help="scratch folder (runs and diagnosis.json)")
    parser.add_argument("--seed", type=int, default=0, help="pre-training seed (the study's is 0; others give the "
                        "spread of the probe over random initialisations)")
    parser.add_argument("--pretrain_overrides", default="", help="extra fit arguments for the pre-training runs, "
                        "one string (e.g. '--model.init_args.warmup_epochs=0.5'); the study's recipe when empty")
    parser.add_argument("--study_args", default="", help="extra study arguments, one string (e.g. larger "
                        "'--phantoms {...}'); the study's configuration when empty")
    parser.add_argument("--check_loading", type=int, default=1, help="1: also run the export → load check")
    args = parser.parse_args(argv)
    if len(args.probe_every) != len(args.steps):
        raise SystemExit("--probe_every: give one interval per --steps value")
    result: dict[str, Any] = {"runs": [], "loading": []}
    for method in args.methods:
        for steps, every in zip(args.steps, args.probe_every):
            run = pretrain(method, steps, every, args.output, args.seed, shlex.split(args.pretrain_overrides),
                           shlex.split(args.study_args))
            result["runs"].append(run)
            print(f"\n## {method}, {steps} steps, seed {args.seed}: losses (window means)\n\n{curve_table(run, every)}")
            print(f"\n## {method}, {steps} steps, seed {args.seed}: online probe\n\n{probe_table(run)}", flush=True)
            for when, values in run.get("input_dependence", {}).items():
                print(f"input dependence at {when}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)
        if args.check_loading:
            checks = check_loading(method, Path(result["runs"][-len(args.steps)]["encoder"]), args.output,
                                   shlex.split(args.study_args))
            result["loading"] += checks
            print(f"\n## {method}: export → load\n\n" + "\n".join(json.dumps(c) for c in checks), flush=True)
        (args.output / "diagnosis.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
