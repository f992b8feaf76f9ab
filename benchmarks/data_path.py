"""Data path: patches per second delivered to the training loop, cold-cache preparation, disk, memory.

Pipelines, all with the same preprocessing (RAS, resampling to 1.5 × 1.5 × 2 mm, HU window
[-175, 250] → [0, 1], padding to the patch; no foreground crop on either side), random patches,
batch 2, 4 patches per volume load, 2 workers wherever a library takes workers:

* ``ours`` — :class:`data_modules.PretrainDataModule`: check and preprocess once into the on-disk
  cache (one decode per volume, 2 preprocessing threads), then a TorchIO queue over memory-mapped
  arrays whose sampler cuts patch *views* (default: no queue workers);
* ``ours_float16`` / ``ours_int16`` / ``ours_float32_blosc2`` / ``ours_int16_blosc2`` — the same with a
  compact or compressed cache (``cache_storage``): bytes per voxel, disk for the corpus, and the
  largest difference from the float32 cache of the same files;
* ``torchio_naive`` — TorchIO as its docs show it: ``tio.Queue`` (2 workers) over
  ``SubjectsDataset`` of the ``.nii.gz`` files with the preprocessing as the dataset's transform
  (every volume decoded and preprocessed each time it is loaded; rate = one whole epoch);
* ``monai_cache`` — MONAI ``CacheDataset`` (deterministic transforms cached in RAM, filled by 2
  threads) + ``RandSpatialCropSamplesd(num_samples=4)`` in a DataLoader with 2 persistent workers
  and ONE long epoch (a ``RandomSampler`` with replacement over 10⁶ draws), so no epoch boundary
  drains its prefetch pipeline during the measurement; each 4-patch item is consumed as two
  batches of 2;
* ``slicing`` — the ceiling: the preprocessed arrays of our cache, memory-mapped, sliced in the
  main process with nothing else around.

Cold-cache preparation is timed for ``ours`` (data-module set-up on an empty cache: discovery,
checks and preprocessing) and for MONAI (the ``CacheDataset`` fill) on the same files with the same
number of workers, both in one process, alternated ``cold_repeats`` times (the order swapped every
pair) and reported as medians: a single preparation of 12 phantoms takes half a second, where one
run's noise decides the ratio. A small-corpus section compares our patches/s over epochs of 3 and of 30
volumes (each epoch rebuilds the queue: it must not cost per patch).

Every batch is consumed (its voxels summed) so lazy data is materialised. Volumes: 512 × 512 × 160
synthetic CTs at 0.7 × 0.7 × 2.5 mm stored as LPS-oriented int16 ``.nii.gz`` (a phantom of the
embedded generator at half resolution, upsampled, plus noise at full resolution), generated once
into ``$LMIM_BENCH_DIR`` (default ``~/.cache/lightning_mim/benchmark``); and the embedded phantom
cohort. Each measurement runs in its own fresh process (:func:`benchmarks.common.run_isolated`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import MemorySampler, markdown_table, ratio, run_isolated, table, target
from lightning_mim.run_files import atomic_path

#: The preprocessing every pipeline applies (ours as a Preprocessing, the others as transforms).
PREPROCESSING = dict(modality="ct", orientation="RAS", spacing=(1.5, 1.5, 2.0), intensity="window",
                     window=(-175.0, 250.0), output_range=(0.0, 1.0), crop_foreground=False)
BATCH_SIZE = 2
SAMPLES_PER_VOLUME = 4
QUEUE_LENGTH = 24
LOADER_WORKERS = 2
MONAI_DRAWS = 10**6  # one epoch of the MONAI baseline: far more items than any measurement consumes
COMPACT_STORAGES = ("float16", "int16", "float32_blosc2", "int16_blosc2")


@dataclass(frozen=True)
class DataBenchConfig:
    """Sizes of one data-path run (``full`` and ``quick`` presets below)."""

    volumes: int = 3  # N; memory is also measured with 2N
    shape: tuple[int, int, int] = (512, 512, 160)
    spacing: tuple[float, float, float] = (0.7, 0.7, 2.5)
    patch: int = 96
    phantom_cases: int = 12
    min_patches: int = 120
    min_seconds: float = 4.0
    max_seconds: float = 90.0
    small_corpora: tuple[int, int] = (3, 30)  # phantom volumes per epoch: few vs many
    scale_counts: tuple[int, ...] = (10, 100, 1000)  # corpus sizes of the scaling table (small volumes)
    scale_shape: tuple[int, int, int] = (96, 96, 48)
    cold_repeats: int = 5  # alternated cold preparations of ours and MONAI's per cohort

    @staticmethod
    def full() -> DataBenchConfig:
        return DataBenchConfig()

    @staticmethod
    def quick() -> DataBenchConfig:
        return DataBenchConfig(volumes=2, shape=(192, 192, 64), spacing=(1.0, 1.0, 3.0), patch=64, phantom_cases=4,
                               min_patches=24, min_seconds=1.0, max_seconds=30.0, scale_counts=(10, 100),
                               cold_repeats=2)


def bench_root() -> Path:
    return Path(os.environ.get("LMIM_BENCH_DIR") or "~/.cache/lightning_mim/benchmark").expanduser()


# --------------------------------------------------------------------------- synthetic full-size CTs
def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> np.ndarray:
    """int16 HU volume: an embedded-generator phantom at half resolution, trilinearly upsampled, plus noise.

    Generating at half resolution keeps the one-off cost low; the full-resolution noise keeps the
    file as hard to compress (and to decode) as a real CT.
    """
    import torch
    import torch.nn.functional as F

    from data_modules.phantoms import generate_phantom

    rng = np.random.default_rng(seed)
    coarse_shape = tuple(max(16, n // 2) for n in shape)
    coarse_spacing = tuple(s * n / c for s, n, c in zip(spacing, shape, coarse_shape))
    hu, _ = generate_phantom(coarse_shape, coarse_spacing, rng)
    volume = F.interpolate(torch.from_numpy(hu.astype(np.float32))[None, None], size=shape, mode="trilinear",
                           align_corners=False)[0, 0].numpy()
    volume += rng.normal(0.0, 12.0, shape).astype(np.float32)
    return np.clip(np.rint(volume), -1024, 3071).astype(np.int16)


def ensure_synthetic_cts(count: int, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                         root: Path | None = None, seed: int = 0) -> list[Path]:
    """Paths of ``count`` synthetic CT files, generated on first use and reused afterwards."""
    import nibabel as nib

    folder = (root or bench_root()) / ("cts-" + "x".join(map(str, shape)) + "-" + "x".join(f"{s:g}" for s in spacing)
                                       + f"mm-seed{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    # LPS storage (as converted from DICOM): reorientation to RAS has real work to do.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
    affine[2, 3] *= -1
    paths = []
    for index in range(count):
        path = folder / f"ct_{index:03d}.nii.gz"
        if not path.is_file():
            image = nib.Nifti1Image(synthetic_ct(shape, spacing, seed * 1000 + index), affine)
            image.header.set_xyzt_units("mm")
            with atomic_path(path, keep_suffixes=True) as temporary:  # nibabel picks the format from the name
                nib.save(image, temporary)
        paths.append(path)
    return paths


def write_csv(paths: list[Path], destination: Path) -> Path:
    with destination.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "case_id"])
        writer.writerows([str(p), p.name.split(".")[0]] for p in paths)
    return destination


# --------------------------------------------------------------------------- consuming batches
def consume(images: Any) -> int:
    """Sum the batch's voxels (forces any lazy read) and return the number of patches in it."""
    images.sum().item()
    return int(images.shape[0])


def drain(epochs: Iterator[Iterable], image_of: Callable[[Any], Any], min_patches: int, min_seconds: float,
          max_seconds: float) -> dict[str, float]:
    """Consume batches epoch after epoch until enough patches and seconds have passed; the rate."""
    start, patches = time.perf_counter(), 0
    for epoch in epochs:
        for batch in epoch:
            patches += consume(image_of(batch))
            elapsed = time.perf_counter() - start
            if (patches >= min_patches and elapsed >= min_seconds) or elapsed >= max_seconds:
                return {"patches": patches, "seconds": elapsed, "patches_per_s": patches / elapsed}
    elapsed = time.perf_counter() - start
    return {"patches": patches, "seconds": elapsed, "patches_per_s": patches / max(elapsed, 1e-9)}


def _continue(first: Iterator, make: Callable[[], Iterable]) -> Iterator[Iterable]:
    """The rest of the current epoch, then fresh epochs forever."""
    yield first
    while True:
        yield iter(make())


def _first(iterator: Iterator, image_of: Callable[[Any], Any]) -> None:
    consume(image_of(next(iterator)))


# --------------------------------------------------------------------------- the pipelines (child processes)
def cache_disk(volumes) -> dict[str, float]:
    """Bytes of the cached image arrays (``image.npy``) of ``volumes`` and bytes per voxel."""
    size = sum(Path(v.image).stat().st_size for v in volumes)
    voxels = sum(int(np.prod(v.shape)) for v in volumes)
    return {"cache_bytes": size, "bytes_per_voxel": size / max(voxels, 1)}


def measure_ours(csv_path: str | None, datalist: str | None, cache_dir: str, patch: int, min_patches: int,
                 min_seconds: float, max_seconds: float, preprocess_workers: int = LOADER_WORKERS,
                 storage: str = "float32", reference_cache: str | None = None) -> dict[str, Any]:
    """Cold preparation, first batches, patches/s; ``reference_cache``: a float32 cache of the same files
    to measure a compact ``storage``'s largest reconstruction error against."""
    from data_modules import PretrainDataModule
    from data_modules.presets import Preprocessing

    def build(cache: str = cache_dir, cache_storage: str = storage):
        return PretrainDataModule(csv=csv_path, datalist=datalist, preprocessing=Preprocessing(**PREPROCESSING),
                                  patch_size=patch, samples_per_volume=SAMPLES_PER_VOLUME, queue_length=QUEUE_LENGTH,
                                  batch_size=BATCH_SIZE, val_fraction=0.0, cache_dir=cache,
                                  preprocess_workers=preprocess_workers, cache_storage=cache_storage)

    def image_of(batch):
        return batch["image"]

    with MemorySampler() as one_off:
        start = time.perf_counter()
        module = build()
        module.setup("fit")
        preprocessing_s = time.perf_counter() - start
        _first(iter(module.train_dataloader()), image_of)
        first_cold_s = time.perf_counter() - start
    del module
    start = time.perf_counter()
    module = build()
    module.setup("fit")
    iterator = iter(module.train_dataloader())
    _first(iterator, image_of)
    first_cached_s = time.perf_counter() - start
    loader = module.train_dataloader()
    epochs = _continue(iterator, lambda: loader)
    with MemorySampler() as training:
        rate = drain(epochs, image_of, min_patches, min_seconds, max_seconds)
    result = {"volumes": len(module.train_volumes), "preprocessing_s": preprocessing_s,
              "first_batch_cold_s": first_cold_s, "first_batch_cached_s": first_cached_s, **rate,
              "memory_one_off": one_off.report(), "memory_training": training.report(),
              "cached_shape": list(module.train_volumes[0].shape), "storage": storage,
              **cache_disk(module.train_volumes)}
    if storage == "float32":
        result["interleaved_with_slicing"] = interleaved_rates(
            (batch for epoch in epochs for batch in epoch), slicing_batches([v.image for v in module.train_volumes],
                                                                            patch), image_of, min_patches,
            min_seconds, max_seconds)
    if reference_cache is not None:
        reference = build(reference_cache, "float32")
        result["max_abs_error"] = max_difference(module.train_volumes, reference)
        exact = (batch["image"] for epoch in _continue(iter(reference.train_dataloader()), reference.train_dataloader)
                 for batch in epoch)
        result["interleaved_with_float32"] = interleaved_rates((batch for epoch in epochs for batch in epoch), exact,
                                                               image_of, min_patches, min_seconds, max_seconds)
    return result


def max_difference(volumes, reference_module) -> float:
    """Largest |decoded compact voxel - float32 voxel| over ``volumes`` (same cases in the reference cache)."""
    from data_modules.cache import decode_voxels, read_cached_array

    reference_module.setup("fit")
    reference = {v.case_id: v for v in reference_module.train_volumes}
    worst = 0.0
    for volume in volumes:
        decoded = decode_voxels(read_cached_array(volume.image)[0][:], volume.image).numpy()
        exact = np.load(reference[volume.case_id].image, mmap_mode="r")
        worst = max(worst, float(np.abs(decoded - exact).max()))
    return worst


def measure_epoch_costs(datalists: dict[str, str], cache_dir: str, patch: int, min_patches: int, min_seconds: float,
                        max_seconds: float) -> dict[str, Any]:
    """Our patches/s over many epochs of each corpus (each epoch rebuilds the queue), cache warm.

    The corpora's streams are timed alternately, batch by batch, in this one process, so a change
    of machine load hits them alike (the ratio is what matters).
    """
    from data_modules import PretrainDataModule
    from data_modules.presets import Preprocessing

    def epochs(datalist: str) -> Iterator:
        module = PretrainDataModule(datalist=datalist, preprocessing=Preprocessing(**PREPROCESSING), patch_size=patch,
                                    samples_per_volume=SAMPLES_PER_VOLUME, queue_length=QUEUE_LENGTH,
                                    batch_size=BATCH_SIZE, val_fraction=0.0, cache_dir=cache_dir,
                                    preprocess_workers=LOADER_WORKERS)
        module.setup("fit")
        epoch = 0
        while True:
            module.set_epoch(epoch)
            counts[datalist] = epoch = epoch + 1
            yield from module.train_dataloader()

    counts: dict[str, int] = {}
    streams = {name: epochs(datalist) for name, datalist in datalists.items()}
    for stream in streams.values():
        _first(stream, lambda b: b["image"])
    seconds, patches = dict.fromkeys(streams, 0.0), dict.fromkeys(streams, 0)
    while True:
        for name, stream in streams.items():
            start = time.perf_counter()
            patches[name] += consume(next(stream)["image"])
            seconds[name] += time.perf_counter() - start
        total = sum(seconds.values())
        if (min(patches.values()) >= min_patches and total >= 2 * min_seconds) or total >= max_seconds:
            break
    return {name: {"patches": patches[name], "seconds": seconds[name], "patches_per_s": patches[name] / seconds[name],
                   "epochs": counts[datalists[name]]} for name in streams}


def measure_corpus_scale(csv_path: str, cache_dir: str, patch: int) -> dict[str, Any]:
    """Cold preparation, cache bytes, and the time a later run takes to its first batch (cache warm)."""
    from data_modules import PretrainDataModule
    from data_modules.presets import Preprocessing

    def build():
        return PretrainDataModule(csv=csv_path, preprocessing=Preprocessing(**PREPROCESSING), patch_size=patch,
                                  samples_per_volume=SAMPLES_PER_VOLUME, queue_length=QUEUE_LENGTH,
                                  batch_size=BATCH_SIZE, val_fraction=0.0, cache_dir=cache_dir,
                                  preprocess_workers=LOADER_WORKERS)

    start = time.perf_counter()
    module = build()
    module.setup("fit")
    preparation_s = time.perf_counter() - start
    del module
    start = time.perf_counter()
    module = build()
    module.setup("fit")
    _first(iter(module.train_dataloader()), lambda batch: batch["image"])
    first_batch_s = time.perf_counter() - start
    return {"volumes": len(module.train_volumes), "preparation_s": preparation_s,
            "preparation_s_per_volume": preparation_s / len(module.train_volumes),
            "first_batch_warm_s": first_batch_s, **cache_disk(module.train_volumes)}


class PreprocessOnTheFly:
    """Callable transform for ``tio.SubjectsDataset``: our preprocessing, applied at every load."""

    def __init__(self, patch: int) -> None:
        from data_modules.presets import Preprocessing

        self.preprocessing = Preprocessing(**PREPROCESSING).with_min_size((patch,) * 3)

    def __call__(self, subject):
        return self.preprocessing.apply(subject)


def measure_torchio_naive(paths: list[str], patch: int) -> dict[str, Any]:
    """One whole epoch: with the queue as long as an epoch's patches, every volume is decoded and
    preprocessed before the first batch, and again in every epoch, so the epoch is the steady state."""
    import torchio as tio
    from torch.utils.data import DataLoader

    with MemorySampler() as memory:
        start = time.perf_counter()
        subjects = tio.SubjectsDataset([tio.Subject(image=tio.ScalarImage(p)) for p in paths],
                                       transform=PreprocessOnTheFly(patch))
        queue = tio.Queue(subjects, max_length=QUEUE_LENGTH, samples_per_volume=SAMPLES_PER_VOLUME,
                          sampler=tio.UniformSampler(patch), num_workers=LOADER_WORKERS)
        first_s, patches = None, 0
        for batch in DataLoader(queue, batch_size=BATCH_SIZE, num_workers=0):
            patches += consume(batch["image"][tio.DATA])
            first_s = first_s or time.perf_counter() - start
        seconds = time.perf_counter() - start
    report = memory.report()
    return {"volumes": len(paths), "preprocessing_s": None, "first_batch_cold_s": first_s,
            "first_batch_cached_s": first_s, "patches": patches, "seconds": seconds,
            "patches_per_s": patches / seconds, "memory_one_off": report, "memory_training": report}


def monai_transforms(patch: int):
    from monai import transforms as T

    keys = ["image"]
    spacing, window = PREPROCESSING["spacing"], PREPROCESSING["window"]
    deterministic = [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        T.Orientationd(keys, axcodes="RAS"),
        T.Spacingd(keys, pixdim=spacing, mode="bilinear"),
        T.ScaleIntensityRanged(keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        T.SpatialPadd(keys, spatial_size=(patch,) * 3, value=0.0),
    ]
    random = [T.RandSpatialCropSamplesd(keys, roi_size=(patch,) * 3, num_samples=SAMPLES_PER_VOLUME, random_size=False)]
    return T.Compose(deterministic + random)


def measure_cold_preparation(csv_path: str | None, datalist: str | None, paths: list[str], cache_root: str, patch: int,
                             repeats: int) -> dict[str, Any]:
    """Our cold-cache preparation and MONAI's CacheDataset fill of the same files, alternated ``repeats`` times.

    One pair after another in one process, the order swapped each time, so both sides share the
    machine's state (load, page cache); the per-pair ratios are robust where single runs of under a
    second are not. Each of ours starts on an empty cache folder.
    """
    from monai.data import CacheDataset

    from data_modules import PretrainDataModule
    from data_modules.presets import Preprocessing

    def ours(index: int) -> None:
        PretrainDataModule(csv=csv_path, datalist=datalist, preprocessing=Preprocessing(**PREPROCESSING),
                           patch_size=patch, samples_per_volume=SAMPLES_PER_VOLUME, queue_length=QUEUE_LENGTH,
                           batch_size=BATCH_SIZE, val_fraction=0.0, cache_dir=str(Path(cache_root) / f"cold-{index}"),
                           preprocess_workers=LOADER_WORKERS).setup("fit")

    def monai(index: int) -> None:
        CacheDataset([{"image": p} for p in paths], monai_transforms(patch), cache_rate=1.0,
                     num_workers=LOADER_WORKERS, progress=False)

    seconds: dict[str, list[float]] = {"ours": [], "monai": []}
    for index in range(repeats):
        for name, prepare in (("ours", ours), ("monai", monai))[:: 1 if index % 2 == 0 else -1]:
            start = time.perf_counter()
            prepare(index)
            seconds[name].append(time.perf_counter() - start)
    pairs = [a / b for a, b in zip(seconds["ours"], seconds["monai"])]
    return {"ours_s": seconds["ours"], "monai_s": seconds["monai"], "ours_median_s": statistics.median(seconds["ours"]),
            "monai_median_s": statistics.median(seconds["monai"]), "ratio_median": statistics.median(pairs)}


def measure_monai_cache(paths: list[str], patch: int, min_patches: int, min_seconds: float,
                        max_seconds: float) -> dict[str, Any]:
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from torch.utils.data import RandomSampler

    def image_of(batch):
        return batch["image"]

    def epoch():
        # Each item holds SAMPLES_PER_VOLUME patches; the training loop takes them BATCH_SIZE at a time.
        for batch in loader:
            yield from ({"image": part} for part in batch["image"].split(BATCH_SIZE))

    with MemorySampler() as one_off:
        start = time.perf_counter()
        dataset = CacheDataset([{"image": p} for p in paths], monai_transforms(patch), cache_rate=1.0,
                               num_workers=LOADER_WORKERS, progress=False)
        cache_s = time.perf_counter() - start
        # One long epoch (as MONAI's tutorials train: persistent workers, no epoch end inside the measurement).
        draws = RandomSampler(dataset, replacement=True, num_samples=MONAI_DRAWS)
        loader = DataLoader(dataset, batch_size=1, sampler=draws, num_workers=LOADER_WORKERS,
                            collate_fn=list_data_collate, persistent_workers=True)
        iterator = epoch()
        _first(iterator, image_of)
        first_s = time.perf_counter() - start
    with MemorySampler() as training:
        rate = drain(_continue(iterator, epoch), image_of, min_patches, min_seconds, max_seconds)
    return {"volumes": len(paths), "preprocessing_s": cache_s, "first_batch_cold_s": first_s,
            "first_batch_cached_s": first_s, **rate, "memory_one_off": one_off.report(),
            "memory_training": training.report()}


def slicing_batches(paths: list, patch: int, seed: int = 0) -> Iterator:
    """Endless batches cut from memory-mapped arrays with plain NumPy slicing: the ceiling."""
    import torch

    arrays = [np.load(p, mmap_mode="r") for p in paths]
    rng = np.random.default_rng(seed)
    while True:
        batch = np.empty((BATCH_SIZE, 1, patch, patch, patch), dtype=np.float32)
        for item in range(BATCH_SIZE):
            array = arrays[int(rng.integers(len(arrays)))]
            a, b, c = (int(rng.integers(n - patch + 1)) for n in array.shape[1:])
            batch[item] = array[:1, a : a + patch, b : b + patch, c : c + patch]
        yield torch.from_numpy(batch)


def interleaved_rates(ours: Iterator, ceiling: Iterator, image_of: Callable[[Any], Any], min_patches: int,
                      min_seconds: float, max_seconds: float) -> dict[str, float]:
    """Patches/s of two batch streams timed alternately (one batch each), robust to load changes."""
    seconds = {"ours": 0.0, "slicing": 0.0}
    patches = {"ours": 0, "slicing": 0}
    streams = {"ours": (ours, image_of), "slicing": (ceiling, lambda batch: batch)}
    while True:
        for name, (stream, image) in streams.items():
            start = time.perf_counter()
            patches[name] += consume(image(next(stream)))
            seconds[name] += time.perf_counter() - start
        total = sum(seconds.values())
        if (min(patches.values()) >= min_patches and total >= 2 * min_seconds) or total >= max_seconds:
            break
    rates = {f"{name}_patches_per_s": patches[name] / seconds[name] for name in seconds}
    return {**rates, "ratio": rates["ours_patches_per_s"] / rates["slicing_patches_per_s"]}


def measure_slicing(csv_path: str | None, datalist: str | None, cache_dir: str, patch: int, min_patches: int,
                    min_seconds: float, max_seconds: float) -> dict[str, Any]:
    from data_modules import PretrainDataModule
    from data_modules.presets import Preprocessing

    module = PretrainDataModule(csv=csv_path, datalist=datalist, preprocessing=Preprocessing(**PREPROCESSING),
                                patch_size=patch, val_fraction=0.0, cache_dir=cache_dir)
    module.setup("fit")  # the cache is warm: this only indexes it
    with MemorySampler() as memory:
        start = time.perf_counter()
        iterator = slicing_batches([v.image for v in module.train_volumes], patch)
        _first(iterator, lambda b: b)
        first_s = time.perf_counter() - start
        rate = drain(_continue(iterator, lambda: iterator), lambda b: b, min_patches, min_seconds, max_seconds)
    report = memory.report()
    return {"volumes": len(module.train_volumes), "preprocessing_s": None, "first_batch_cold_s": None,
            "first_batch_cached_s": first_s, **rate, "memory_one_off": report, "memory_training": report}


# --------------------------------------------------------------------------- orchestration
PIPELINE_LABELS = {
    "ours": "ours: PretrainDataModule (cache + memory-mapped queue)",
    "ours_float16": "ours, float16 cache",
    "ours_int16": "ours, int16 cache (scale + offset)",
    "ours_float32_blosc2": "ours, float32 cache compressed (Blosc2)",
    "ours_int16_blosc2": "ours, int16 cache compressed (Blosc2)",
    "torchio_naive": "TorchIO Queue on .nii.gz, preprocessing on the fly",
    "monai_cache": "MONAI CacheDataset + RandSpatialCropSamplesd",
    "slicing": "ceiling: memory-mapped .npy, plain slicing",
}
PIPELINE_CONFIGS = {
    "ours": f"{LOADER_WORKERS} preprocessing threads, one decode per volume; queue: 0 workers, length {QUEUE_LENGTH}, "
            f"{SAMPLES_PER_VOLUME} patches/volume",
    "ours_float16": "as ours, cache_storage float16",
    "ours_int16": "as ours, cache_storage int16",
    "ours_float32_blosc2": "as ours, cache_storage float32_blosc2",
    "ours_int16_blosc2": "as ours, cache_storage int16_blosc2",
    "torchio_naive": f"tio.Queue(num_workers={LOADER_WORKERS}, max_length={QUEUE_LENGTH}, samples_per_volume="
                     f"{SAMPLES_PER_VOLUME}, UniformSampler) + DataLoader(num_workers=0), transform on SubjectsDataset",
    "monai_cache": f"CacheDataset(cache_rate=1, num_workers={LOADER_WORKERS}) + DataLoader(num_workers={LOADER_WORKERS}, "
                   f"persistent_workers, RandomSampler(replacement, {MONAI_DRAWS:.0e} draws) = one epoch)",
    "slicing": "np.load(mmap_mode='r') + slicing in the main process",
}


def _safe(runs: dict, key: str, function, *args, timeout: float = 1800.0, **kwargs) -> None:
    try:
        runs[key] = run_isolated(function, *args, timeout=timeout, **kwargs)
    except Exception as error:  # noqa: BLE001 - one failing pipeline must not hide the others
        runs[key] = {"error": str(error)[-3000:]}


def _row(cohort: str, name: str, run: dict) -> list:
    if "error" in run:
        return [cohort, PIPELINE_LABELS[name], None, None, None, None, None, None, None, "failed (see JSON)",
                PIPELINE_CONFIGS[name]]
    training = run["memory_training"]
    one_off = run["memory_one_off"]
    return [cohort, PIPELINE_LABELS[name], run["volumes"], run["patches_per_s"], run["preprocessing_s"],
            run["first_batch_cold_s"], run["first_batch_cached_s"], max(one_off["peak_rss_mb"], training["peak_rss_mb"]),
            training["peak_private_mb"], "", PIPELINE_CONFIGS[name]]


def run(config: DataBenchConfig, workdir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """All data-path measurements; returns a results section."""
    root = workdir or bench_root()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="data-path-", dir=root))
    n, patch = config.volumes, config.patch
    limits = dict(min_patches=config.min_patches, min_seconds=config.min_seconds, max_seconds=config.max_seconds)
    runs: dict[str, dict] = {}
    try:
        start = time.perf_counter()
        paths = ensure_synthetic_cts(2 * n, config.shape, config.spacing, root=root)
        generation_s = time.perf_counter() - start
        log(f"data: {2 * n} synthetic CTs ready ({generation_s:.0f} s)")
        for count in (n, 2 * n):
            csv_path = str(write_csv(paths[:count], scratch / f"cts_{count}.csv"))
            cache = str(scratch / f"cache_{count}")
            subset = [str(p) for p in paths[:count]]
            log(f"data: ours, {count} CTs")
            _safe(runs, f"ct{count}/ours", measure_ours, csv_path, None, cache, patch, **limits)
            log(f"data: slicing ceiling, {count} CTs")
            _safe(runs, f"ct{count}/slicing", measure_slicing, csv_path, None, cache, patch, **limits)
            log(f"data: MONAI CacheDataset, {count} CTs")
            _safe(runs, f"ct{count}/monai_cache", measure_monai_cache, subset, patch, **limits)
        for storage in COMPACT_STORAGES:
            log(f"data: ours with a {storage} cache, {2 * n} CTs")
            _safe(runs, f"ct{2 * n}/ours_{storage}", measure_ours, csv_path, None, str(scratch / f"cache_{storage}"),
                  patch, storage=storage, reference_cache=cache, **limits)
        log(f"data: naive TorchIO, {2 * n} CTs")
        _safe(runs, f"ct{2 * n}/torchio_naive", measure_torchio_naive, [str(p) for p in paths], patch)
        # After the patch streams: its ten fresh caches must not be written back while others are timed.
        log(f"data: cold preparation, ours and MONAI alternated {config.cold_repeats}×, {2 * n} CTs")
        _safe(runs, f"ct{2 * n}/cold", measure_cold_preparation, csv_path, None, subset, str(scratch / "cold_cts"), patch,
              config.cold_repeats)

        from data_modules.phantoms import ensure_phantom_cohort
        from data_modules.sources import cases_from_datalist

        datalist = ensure_phantom_cohort(root / "phantoms", num_cases=config.phantom_cases)
        phantom_paths = [str(c.image) for c in cases_from_datalist(datalist, "training", with_labels=False)]
        cache = str(scratch / "cache_phantoms")
        for name, function, args, kwargs in (
            ("ours", measure_ours, (None, str(datalist), cache, patch), limits),
            ("slicing", measure_slicing, (None, str(datalist), cache, patch), limits),
            *((f"ours_{storage}", measure_ours, (None, str(datalist), str(scratch / f"cache_phantoms_{storage}"), patch),
               {**limits, "storage": storage, "reference_cache": cache}) for storage in COMPACT_STORAGES),
            ("monai_cache", measure_monai_cache, (phantom_paths, patch), limits),
            ("torchio_naive", measure_torchio_naive, (phantom_paths, patch), {}),
            ("cold", measure_cold_preparation, (None, str(datalist), phantom_paths, str(scratch / "cold_phantoms"), patch,
                                                config.cold_repeats), {}),
        ):
            log(f"data: {name}, phantoms")
            _safe(runs, f"phantoms/{name}", function, *args, **kwargs)

        few, many = config.small_corpora
        corpus = ensure_phantom_cohort(root / "phantoms", num_cases=many)
        small_lists = {}
        for count in (few, many):
            subset_list = scratch / f"phantoms_{count}.json"
            entries = json.loads(Path(corpus).read_text())
            base = Path(corpus).parent
            entries["training"] = [{key: str(base / value) if key in ("image", "label") else value
                                    for key, value in item.items()} for item in entries["training"][:count]]
            subset_list.write_text(json.dumps(entries))
            small_lists[f"epochs_{count}"] = str(subset_list)
        scale_paths = ensure_synthetic_cts(max(config.scale_counts), config.scale_shape, config.spacing, root=root,
                                           seed=1)
        for count in config.scale_counts:
            log(f"data: scaling, {count} synthetic volumes {config.scale_shape}")
            csv_path = str(write_csv(scale_paths[:count], scratch / f"scale_{count}.csv"))
            _safe(runs, f"scale/{count}", measure_corpus_scale, csv_path, str(scratch / f"cache_scale_{count}"),
                  min(patch, min(config.scale_shape)))
        log(f"data: ours over epochs of {few} and of {many} phantoms, interleaved")
        _safe(runs, "small/epochs", measure_epoch_costs, small_lists, str(scratch / "cache_small"), patch, **limits)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize_runs(runs, config, generation_s)


def summarize_runs(runs: dict[str, dict], config: DataBenchConfig, generation_s: float | None = None) -> dict[str, Any]:
    n = config.volumes
    cohort_names = {f"ct{n}": f"{n} CTs {'×'.join(map(str, config.shape))}",
                    f"ct{2 * n}": f"{2 * n} CTs {'×'.join(map(str, config.shape))}",
                    "phantoms": f"{config.phantom_cases} phantoms 160×160×64"}
    rows = []
    for key, run_result in runs.items():
        cohort, name = key.split("/")
        if cohort in cohort_names and name in PIPELINE_LABELS:  # not the cold-preparation pairs: a table of their own
            rows.append(_row(cohort_names[cohort], name, run_result))

    def rate(key: str) -> float | None:
        return runs.get(key, {}).get("patches_per_s")

    def private(key: str) -> float | None:
        return runs.get(key, {}).get("memory_training", {}).get("peak_private_mb")

    def interleaved(key: str) -> float | None:
        return runs.get(key, {}).get("interleaved_with_slicing", {}).get("ratio")

    big = f"ct{2 * n}"
    vs_monai = ratio(rate(f"{big}/ours"), rate(f"{big}/monai_cache"))
    vs_ceiling = interleaved(f"{big}/ours")
    cached_first = runs.get(f"{big}/ours", {}).get("first_batch_cached_s")
    growth = None
    if private(f"ct{n}/ours") is not None and private(f"{big}/ours") is not None:
        growth = private(f"{big}/ours") - private(f"ct{n}/ours")
    growth_limit = max(64.0, 0.05 * (private(f"ct{n}/ours") or 0.0))
    monai_growth = None
    if private(f"ct{n}/monai_cache") is not None and private(f"{big}/monai_cache") is not None:
        monai_growth = private(f"{big}/monai_cache") - private(f"ct{n}/monai_cache")
    ratios = [["ours / MONAI CacheDataset", vs_monai, ratio(rate("phantoms/ours"), rate("phantoms/monai_cache"))],
              ["ours / slicing ceiling, interleaved batch by batch in one process", vs_ceiling,
               interleaved("phantoms/ours")],
              ["ours / slicing ceiling, separate processes", ratio(rate(f"{big}/ours"), rate(f"{big}/slicing")),
               ratio(rate("phantoms/ours"), rate("phantoms/slicing"))],
              ["ours / naive TorchIO", ratio(rate(f"{big}/ours"), rate(f"{big}/torchio_naive")),
               ratio(rate("phantoms/ours"), rate("phantoms/torchio_naive"))]]
    memory_rows = [["ours", private(f"ct{n}/ours"), private(f"{big}/ours"), growth],
                   ["MONAI CacheDataset", private(f"ct{n}/monai_cache"), private(f"{big}/monai_cache"), monai_growth]]
    columns = ["cohort", "pipeline", "volumes", "patches/s", "one-off preprocessing s", "first batch cold s",
               "first batch cached s", "peak RSS MB", "peak private MB (training)", "note", "configuration"]

    def value(key: str, field: str) -> float | None:
        return runs.get(key, {}).get(field)

    preparation_rows, preparation_targets = [], []
    for cohort in (big, "phantoms"):
        ours_s, monai_s = value(f"{cohort}/cold", "ours_median_s"), value(f"{cohort}/cold", "monai_median_s")
        share = value(f"{cohort}/cold", "ratio_median")
        preparation_rows.append([cohort_names[cohort], ours_s, monai_s, share])
        preparation_targets.append(target(f"data: cold cache preparation, ours / MONAI CacheDataset fill, "
                                          f"{cohort_names[cohort]}", share, "≤ 1.0", None if share is None else share <= 1.0))
    compact_rows, compact_targets = [], []
    for cohort in (big, "phantoms"):
        exact_bytes = value(f"{cohort}/ours", "cache_bytes")
        monai_rate = rate(f"{cohort}/monai_cache")
        for storage in ("float32", *COMPACT_STORAGES):
            key = f"{cohort}/ours" if storage == "float32" else f"{cohort}/ours_{storage}"
            saving = ratio(exact_bytes, value(key, "cache_bytes"))
            vs_exact = 1.0 if storage == "float32" else runs.get(key, {}).get("interleaved_with_float32", {}).get("ratio")
            vs_monai_rate = ratio(rate(key), monai_rate)
            error = 0.0 if storage == "float32" else value(key, "max_abs_error")
            compact_rows.append([cohort_names[cohort], storage, value(key, "bytes_per_voxel"),
                                 None if value(key, "cache_bytes") is None else value(key, "cache_bytes") / 2**20,
                                 saving, rate(key), vs_exact, vs_monai_rate, None if error is None else f"{error:.2e}"])
            if storage != "float32":
                met = None if saving is None or vs_monai_rate is None else saving >= 2.0 and vs_monai_rate >= 5.0
                compact_targets.append(target(f"data: {storage} cache, {cohort_names[cohort]}: disk saving vs float32 "
                                              "(and patches/s ≥ 5× MONAI)", saving, "≥ 2× (and ≥ 5×)", met))
    few, many = config.small_corpora
    scale_rows = []
    for count in config.scale_counts:
        entry = runs.get(f"scale/{count}", {})
        scale_rows.append([count, entry.get("preparation_s"), entry.get("preparation_s_per_volume"),
                           None if entry.get("cache_bytes") is None else entry["cache_bytes"] / 2**20,
                           entry.get("bytes_per_voxel"), entry.get("first_batch_warm_s")])
    small = runs.get("small/epochs", {})
    small_share = ratio(small.get(f"epochs_{few}", {}).get("patches_per_s"),
                        small.get(f"epochs_{many}", {}).get("patches_per_s"))
    small_rows = [[f"{count} phantoms", small.get(f"epochs_{count}", {}).get("patches_per_s"),
                   small.get(f"epochs_{count}", {}).get("epochs"), count * SAMPLES_PER_VOLUME] for count in (few, many)]
    return {
        "title": "Data path (patches delivered to the training loop)",
        "config": asdict(config),
        "generation_s": generation_s,
        "runs": runs,
        "tables": [
            table(f"Pipelines — {config.patch}³ patches, batch {BATCH_SIZE}, {SAMPLES_PER_VOLUME} patches per volume "
                  "load, same preprocessing", columns, rows,
                  notes=["Peak RSS: process + workers, over the whole measurement (cache building included); it "
                         "counts the resident pages of memory-mapped files, which are reclaimable page cache.",
                         "Peak private: proportional anonymous + shared memory of process + workers while batches "
                         "are consumed — the RAM the pipeline really holds.",
                         "MONAI's cache lives in RAM: every run rebuilds it, so its 'cached' first batch equals the "
                         "cold one. Naive TorchIO has no cache."]),
            table("Ratios of patches/s", ["comparison", f"{2 * n} CTs", "phantoms"], ratios),
            table(f"Private memory while training, {n} vs {2 * n} volumes (MB)",
                  ["pipeline", f"{n} volumes", f"{2 * n} volumes", "growth"], memory_rows),
            table(f"Cold cache preparation, same files, same preprocessing, {LOADER_WORKERS} workers each (s, median of "
                  f"{config.cold_repeats} alternated pairs)",
                  ["cohort", "ours (checks + preprocessing, one decode)", "MONAI CacheDataset fill",
                   "ours / MONAI (median of the pairs' ratios)"], preparation_rows,
                  notes=["ours = data-module set-up on an empty cache: discovery, file/header/voxel checks and "
                         "preprocessing, arrays written to disk; MONAI = CacheDataset construction (arrays in RAM).",
                         "Both in one process, one after the other, the order swapped every pair; every value is in "
                         "the JSON (runs/<cohort>/cold). The pipelines table's one-off column is a single run each."]),
            table("Compact cache: disk, patches/s, precision", ["cohort", "storage", "bytes/voxel", "cache MiB",
                  "disk saving vs float32", "patches/s", "patches/s vs float32, interleaved", "patches/s vs MONAI",
                  "max |error| vs float32"], compact_rows,
                  notes=["float16: relative error ≤ 2⁻¹¹; int16: per-volume linear scale/offset, error ≤ "
                         "(max − min)/131070; *_blosc2: the same values compressed losslessly by Blosc2 (LZ4, byte "
                         "shuffle, chunks 64³, blocks 32³), each patch decompressing the blocks it covers "
                         "(data_modules.cache.STORAGE_FORMATS).",
                         "'vs float32, interleaved': the compact and the float32 stream timed alternately, batch by "
                         "batch, in one process (robust to load); 'vs MONAI': separate processes."]),
            table(f"Scaling: corpora of small synthetic CTs {'×'.join(map(str, config.scale_shape))} "
                  f"({LOADER_WORKERS} preprocessing threads, float32 cache)",
                  ["volumes", "cold preparation s", "s per volume", "cache MiB", "bytes/voxel",
                   "warm start to first batch s"], scale_rows,
                  notes=["Warm start = a later run (or fit after `preprocess`): data-module set-up that finds every "
                         "entry, then the first batch. Projections to 10k / 100k volumes: benchmarks/COST_MODEL.md."]),
            table(f"Small corpora: our patches/s over epochs of {few} vs {many} phantom volumes (queue rebuilt per epoch)",
                  ["corpus", "patches/s", "epochs consumed", "patches per epoch"], small_rows,
                  notes=["Both streams in one process, timed alternately batch by batch (robust to load changes); "
                         "default settings (no queue workers)."]),
        ],
        "targets": [
            target("data: ours vs MONAI CacheDataset (patches/s)", vs_monai, "≥ 2×",
                   None if vs_monai is None else vs_monai >= 2.0),
            target("data: ours vs slicing ceiling (interleaved)", vs_ceiling, "≥ 0.75",
                   None if vs_ceiling is None else vs_ceiling >= 0.75),
            target("data: first batch once cached (s)", cached_first, "< 2 s",
                   None if cached_first is None else cached_first < 2.0),
            target(f"data: private-memory growth {n} → {2 * n} volumes (MB)", growth,
                   f"≤ {growth_limit:.0f} MB (no growth beyond noise)", None if growth is None else growth <= growth_limit),
            *preparation_targets,
            *compact_targets,
            target(f"data: patches/s with {few} vs {many} volumes per epoch", small_share, "within 20 % (0.8–1.25)",
                   None if small_share is None else 0.8 <= small_share <= 1.25),
        ],
    }


def main() -> None:  # pragma: no cover - convenience entry point
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    section = run(DataBenchConfig.quick() if args.quick else DataBenchConfig.full())
    print(json.dumps(section["runs"], indent=1, default=str))
    for spec in section["tables"]:
        print(markdown_table(spec))


if __name__ == "__main__":
    main()
