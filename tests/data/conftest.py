"""Fixtures for the data tests: one thread, private cache folders, a small shared phantom cohort."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from collections.abc import Callable
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


@pytest.fixture
def inflations(monkeypatch) -> Callable[[Path], float]:
    """How many times a ``.nii.gz`` was inflated since the fixture started, in whole-file units:
    one per ``SimpleITK.ReadImage`` of it (ITK inflates the whole stream) plus the bytes Python's
    ``gzip`` handed out from it (completeness checks, NiBabel) over its uncompressed size.

    The real readers run; they are only wrapped to count.
    """
    itk_reads: Counter = Counter()
    gzip_bytes: Counter = Counter()
    real_read_image, real_gzip_read = sitk.ReadImage, gzip.GzipFile.read

    def read_image(file_name, *args, **kwargs):
        itk_reads[Path(str(file_name)).resolve()] += 1
        return real_read_image(file_name, *args, **kwargs)

    def gzip_read(self, *args, **kwargs):
        data = real_gzip_read(self, *args, **kwargs)
        gzip_bytes[Path(self.name).resolve()] += len(data)
        return data

    monkeypatch.setattr(sitk, "ReadImage", read_image)
    monkeypatch.setattr(gzip.GzipFile, "read", gzip_read)  # NiBabel's readinto goes through read too

    def inflations_of(path: Path) -> float:
        path = Path(path).resolve()
        (uncompressed,) = struct.unpack("<I", path.read_bytes()[-4:])  # the gzip trailer's length
        return itk_reads[path] + gzip_bytes[path] / uncompressed

    return inflations_of
