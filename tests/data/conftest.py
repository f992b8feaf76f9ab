"""Fixtures for the data tests: one thread, private cache folders, a small shared phantom cohort."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from data_modules import ensure_phantom_cohort


@pytest.fixture(autouse=True)
def _one_thread_and_private_dirs(tmp_path_factory, monkeypatch):
    """Share the 2 cores politely and keep every cache out of the user's home."""
    threads, itk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("LMIM_CACHE_DIR", str(base / "default-cache"))
    monkeypatch.setenv("LMIM_DATA_DIR", str(base / "default-phantoms"))
    yield
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)


@pytest.fixture(scope="session")
def phantom_datalist(tmp_path_factory) -> Path:
    """A small phantom cohort shared by the tests that only read it."""
    return ensure_phantom_cohort(tmp_path_factory.mktemp("phantoms"), num_cases=4, shape=(48, 48, 24), seed=0)
