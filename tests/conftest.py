"""Shared test settings: one thread per process (2-core CI), offline W&B, private data folders."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    """One phantom cohort and preprocessing cache per test session, never the user's home folder.

    End-to-end tests that ask for the same cohort share it (the generator and the cache are keyed
    by their parameters), which keeps the suite fast.
    """
    root = tempfile.mkdtemp(prefix="lmim-tests-")
    os.environ.setdefault("LMIM_CACHE_DIR", os.path.join(root, "cache"))
    os.environ.setdefault("LMIM_DATA_DIR", os.path.join(root, "phantoms"))
