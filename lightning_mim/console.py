"""What a run prints: the program name users type, and the one place that mutes known library noise.

Each filter below names one message we have seen on our runs' consoles and why it does not apply;
anything else a library warns about still shows.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

# (message regex, category, why it is muted)
KNOWN_LIBRARY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning,
     "the project's commands (demo, check-data, tests) call the CLI with explicit arguments on purpose"),
    (r"The `srun` command is available on your system but is not used", PossibleUserWarning,
     "runs on a machine with SLURM tools are not always SLURM jobs; the sbatch templates use srun"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning,
     "short epochs (phantoms, demo, small datasets) are expected; step metrics are logged regardless"),
    (r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning,
     "EMA teachers stay in eval mode by design (no dropout or stochastic depth in their targets)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "raised inside Lightning's own pytree helper by newer torch; nothing to change on our side"),
)

# Messages Lightning prints through its rank-zero logger that are advertisements, not information.
KNOWN_LIBRARY_TIPS: tuple[str, ...] = ("💡 Tip:",)
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_LIBRARY_TIPS)


_TIP_FILTER = _DropTips()


def mute_known_library_noise() -> None:
    """Install the targeted filters (idempotent); called by the CLI before it builds anything."""
    for message, category, _why in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)


def program_name() -> str:
    """How the user started us: the ``lightning-mim`` console script, else ``python -m lightning_mim``."""
    started_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "lightning-mim" if started_as.startswith("lightning-mim") else "python -m lightning_mim"
