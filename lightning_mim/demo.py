"""``python -m lightning_mim demo`` (``make demo``): does pre-training pay off? The short form of the study.

AnatoMask is pre-trained on 64 unlabelled phantoms, exported, then its frozen-encoder probe and its
fine-tuning on one labelled phantom are compared with the same network from random initialisation,
3 seeds each, on 6 held-out phantoms (``experiments/study/demo.yaml``; the full study is
``python -m lightning_mim study``). Progress shows one line per run with an ETA; the end is the
per-organ table pre-trained vs scratch (mean ± SD over seeds) with the paired difference and its
95 % CI. Every run is an ordinary ``fit``/``test`` (see each run's ``command.sh``). ``--fast`` shrinks
everything to a smoke test.
"""

from __future__ import annotations

import os

from lightning_mim.recipes import find_recipe
from lightning_mim.study.runner import STUDY_RECIPES, build_parser, run_study, settings_from_args

DEMO_RECIPE = f"{STUDY_RECIPES}/demo.yaml"


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.prog = "python -m lightning_mim demo"
    args = parser.parse_args(["--config", str(find_recipe(DEMO_RECIPE)), *argv])
    os.environ.setdefault("WANDB_SILENT", "true")
    paths = run_study(settings_from_args(args), args.results)
    per_organ = paths["markdown"].read_text().split("## Dice per organ", 1)
    if len(per_organ) == 2:
        print("## Dice per organ" + per_organ[1], flush=True)
    return 0
