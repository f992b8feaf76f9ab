"""``python -m lightning_mim demo`` (``make demo``): the whole transfer path on CPU, in about 15 minutes on 2 cores.

1. pre-train MAE-3D (small ViT) on the embedded phantom cohort — ``experiments/demo/pretrain_mae.yaml``;
2. export its encoder with the ``export-encoder`` command;
3. fine-tune UNETR on a few labelled phantoms from that encoder and from random initialisation, with
   the same network, data, seed and number of steps — ``experiments/demo/finetune_unetr.yaml``;
4. test both on the held-out phantoms and print the per-organ Dice side by side (``compare``).

Every step goes through the real command line (:func:`lightning_mim.cli.main`, in-process), so the
YAML files are exactly what a user would run. ``--fast`` shrinks everything to a smoke test.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from lightning_mim.segmentation.compare import Comparison, compare

# Shipped recipe names (lightning_mim.recipes): found from any folder once the package is installed.
PRETRAIN_CONFIG = "experiments/demo/pretrain_mae.yaml"
FINETUNE_CONFIG = "experiments/demo/finetune_unetr.yaml"
STAGES = ("pretrain", "finetune", "comparison")
#: --fast: a handful of steps on a 5-case cohort of small phantoms (the test suite runs this).
FAST_DATA = ["--data.init_args.phantom_cases", "5", "--data.init_args.phantom_shape", "[64, 64, 24]",
             "--data.init_args.val_fraction", "0.4"]


def _cli(args: list[str]) -> None:
    from lightning_mim.cli import main as cli_main

    print("$ python -m lightning_mim " + " ".join(args), flush=True)
    try:
        code = cli_main(args)
    finally:
        # Lightning's WandbLogger adopts a W&B run still open in the process: close each command's run
        # so the next command logs (and puts its run folder) under its own id.
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if code:
        raise RuntimeError(f"command failed with exit code {code}: {' '.join(args)}")


def run_demo(output: str | os.PathLike = "runs/demo", fast: bool = False, num_labelled: int | None = None,
             pretrain_steps: int | None = None, finetune_steps: int | None = None) -> Comparison:
    """Run the four steps into ``output`` (its demo sub-folders are replaced) and return the comparison."""
    root = Path(output).expanduser()
    for stage in STAGES:
        shutil.rmtree(root / stage, ignore_errors=True)
    common = FAST_DATA if fast else []
    pretrain_steps = pretrain_steps or (2 if fast else None)
    finetune_steps = finetune_steps or (2 if fast else None)
    timings: dict[str, float] = {}

    start = time.monotonic()
    pretrain_dir = root / "pretrain"
    _cli(["fit", "--config", str(PRETRAIN_CONFIG), *common,
          "--trainer.logger.init_args.save_dir", str(pretrain_dir), "--trainer.logger.init_args.id", "mae3d-pretrain",
          *(["--trainer.max_steps", str(pretrain_steps)] if pretrain_steps else [])])
    run = pretrain_dir / "lightning-mim" / "mae3d-pretrain"
    timings["pre-training"] = time.monotonic() - start

    start = time.monotonic()
    encoder = root / "pretrain" / "encoder.pt"
    _cli(["export-encoder", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--output", str(encoder)])
    timings["export"] = time.monotonic() - start

    finetune_dir = root / "finetune"
    tuning = [*common, *(["--trainer.max_steps", str(finetune_steps)] if finetune_steps else []),
              *(["--data.init_args.num_labelled", str(num_labelled)] if num_labelled else [])]
    for name, extra in (("mae3d", ["--model.init_args.pretrained", str(encoder)]), ("scratch", [])):
        start = time.monotonic()
        where = ["--trainer.logger.init_args.save_dir", str(finetune_dir), "--trainer.logger.init_args.id", name]
        _cli(["fit", "--config", str(FINETUNE_CONFIG), *tuning, *extra, *where])
        checkpoint = finetune_dir / "lightning-mim" / name / "checkpoints" / "last.ckpt"
        _cli(["test", "--config", str(FINETUNE_CONFIG), *tuning, *extra, *where, "--ckpt_path", str(checkpoint)])
        timings[f"fine-tuning + test ({name})"] = time.monotonic() - start

    result = compare([finetune_dir], root / "comparison")
    print("\n" + result.markdown)
    print("Wall time of each stage of the demo: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"Tables and plot: {result.markdown_path}, {result.csv}, {result.plot}")
    return result


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m lightning_mim demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=str, default="runs/demo", help="folder for all runs of the demo")
    parser.add_argument("--fast", type=bool, default=False, help="a few steps on tiny phantoms (smoke test)")
    parser.add_argument("--num_labelled", type=int | None, default=None,
                        help="labelled training cases for fine-tuning (default: the YAML's 3)")
    parser.add_argument("--pretrain_steps", type=int | None, default=None, help="pre-training steps (default: the YAML's)")
    parser.add_argument("--finetune_steps", type=int | None, default=None, help="fine-tuning steps (default: the YAML's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    run_demo(args.output, args.fast, args.num_labelled, args.pretrain_steps, args.finetune_steps)
    return 0
