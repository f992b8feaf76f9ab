"""On-disk cache of preprocessed volumes: decode and resample once, afterwards only slice.

Each entry is a folder ``<cache_dir>/<case_id>-<key>/`` holding ``image.npy`` (C x I x J x K, in
the run's :data:`STORAGE_FORMATS` - float32 by default, or a compact float16 / int16 form) or, for the
``*_blosc2`` formats, ``image.b2nd`` (the same array compressed), optionally ``label.npy`` (uint8, or
int16 when classes exceed 255) and ``meta.json`` (affine after preprocessing, spacing, shape, source
paths, preprocessing dict, original geometry, and a ``validation`` summary). ``.npy`` is
uncompressed so it can be memory-mapped: readers page in only the voxels of the patches they cut,
and RAM does not grow with the number of volumes. A compressed image is stored in independently
compressed blocks, and a patch sampler decompresses only the blocks its patches touch, so RAM holds
only patches there too.

The key hashes the resolved source paths with their sizes and ``mtime_ns`` (every file of a DICOM
folder, and the data file of an ``.mhd``), the preprocessing settings and the channel count: a
touched file or a changed setting yields a new entry. Files are written to temporaries, fsync'ed and
moved into place with ``os.replace`` (:func:`lightning_mim.run_files.atomic_write`), ``meta.json``
last, so an entry is complete when ``meta.json`` exists. A writer holds an advisory lock on the entry (``flock`` on
``<cache_dir>/.locks/<entry>.lock``, released by the kernel if the process dies) while it checks and writes, so concurrent writers - the ranks of
a node, two runs, the tasks of a SLURM array on a shared file system - never write one entry
twice: the second finds the entry the first finished and reuses it. (NFS v4 supports ``flock``;
Lustre needs its ``flock`` mount option. Without working locks, writers can duplicate work on an
entry, never corrupt it: each file is written whole, then renamed.)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

import numpy as np
import torch
import torchio as tio

from lightning_mim.run_files import atomic_write

from .presets import Preprocessing, PreprocessingError
from .sources import Case, DataSourceError, read_image, read_label

CACHE_FORMAT_VERSION = 1
IMAGE_FILE = "image.npy"
COMPRESSED_IMAGE_FILE = "image.b2nd"
LABEL_FILE = "label.npy"
META_FILE = "meta.json"
CHECKS_FILE = "checks.json"  # validation result of a case checked before it was preprocessed
LOCKS = ".locks"  # <cache_dir>/.locks/<entry folder name>.lock: writer locks, outside the entries

#: How ``image.npy`` stores the preprocessed intensities (a per-run choice; part of the cache key).
#: ``float32``: exact. ``float16``: 2 bytes/voxel, relative error <= 2**-11 (<= 4.9e-4 on [0, 1]);
#: values beyond +-65504 are refused. ``int16``: 2 bytes/voxel, linear quantisation of each volume's
#: own [min, max] onto 65536 levels (``value = stored * scale + offset``, both in ``meta.json``),
#: absolute error <= scale / 2 = (max - min) / 131070 (7.6e-6 for a [0, 1] CT window), plus float32 rounding.
#: ``<format>_blosc2``: the same values, compressed without further loss by Blosc2 (LZ4 after byte
#: shuffling, chunks of 64³ voxels in blocks of 32³) into ``image.b2nd``; ``float32_blosc2`` is exact.
#: LZ4 rather than Zstandard: it decompresses a 96³ patch 3x faster (~2 ms on one core) for ~25 % more
#: disk. On our synthetic CTs and phantoms windowed to [0, 1] (saturated air and bone compress well),
#: float32_blosc2 takes ~1.6 bytes/voxel and int16_blosc2 ~1.0 (``make bench`` measures it).
CacheStorage = Literal["float32", "float16", "int16", "float32_blosc2", "float16_blosc2", "int16_blosc2"]
STORAGE_FORMATS: tuple[str, ...] = get_args(CacheStorage)
COMPRESSION_SUFFIX = "_blosc2"
BLOSC2_DESCRIPTION = "blosc2 lz4 level 5, byte shuffle, chunks 64³, blocks 32³"
COMPRESSED_CHUNK, COMPRESSED_BLOCK = 64, 32

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$LMIM_CACHE_DIR`` or ``~/.cache/lightning_mim/preprocessed``."""
    return Path(os.environ.get("LMIM_CACHE_DIR") or "~/.cache/lightning_mim/preprocessed").expanduser()


def _source_stats(path: Path) -> list[list]:
    """[name, size, mtime_ns] of every file the source is read from."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = [path]
        if path.name.lower().endswith(".mhd"):  # header + separate data file
            match = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", path.read_text(errors="ignore"), re.M)
            if match and (path.parent / match.group(1)).is_file():
                files.append(path.parent / match.group(1))
    return [[p.name, (stat := p.stat()).st_size, stat.st_mtime_ns] for p in files]


def cache_key(case: Case, preprocessing: Preprocessing, channels: int = 1, storage: CacheStorage = "float32") -> str:
    """Hash of everything the cached arrays depend on."""
    sources = {"image": case.image, "label": case.label}
    description = {
        **({} if storage == "float32" else {"storage": storage}),  # float32 keys predate the compact formats
        "format": CACHE_FORMAT_VERSION,
        "channels": channels,
        "preprocessing": preprocessing.fingerprint(),
        **{
            name: None if path is None else {"path": str(path.resolve()), "files": _source_stats(path)}
            for name, path in sources.items()
        },
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


def entry_dir(cache_dir: Path, case: Case, key: str) -> Path:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id)[-60:]
    return cache_dir / f"{readable}-{key}"


@dataclass(frozen=True)
class CachedVolume:
    """A preprocessed case in the cache; arrays are opened lazily by :func:`read_cached_array`."""

    case_id: str
    image: Path
    label: Path | None
    meta: dict = field(compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(C, I, J, K) after preprocessing."""
        return tuple(self.meta["shape"])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing"])

    @property
    def affine(self) -> np.ndarray:
        return np.array(self.meta["affine"])


def _load_entry(directory: Path, case_id: str) -> CachedVolume | None:
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    image = directory / (COMPRESSED_IMAGE_FILE if meta.get("storage", {}).get("compression") else IMAGE_FILE)
    if meta.get("format") != CACHE_FORMAT_VERSION or not image.is_file():
        return None
    label = directory / LABEL_FILE if meta.get("label") else None
    if label is not None and not label.is_file():
        return None
    return CachedVolume(case_id=case_id, image=image, label=label, meta=meta)


@functools.lru_cache(maxsize=65536)
def _entry_geometry(directory: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    # Entries are content-addressed and never change once written, so caching per process is safe.
    meta = json.loads((directory / META_FILE).read_text())
    scaling = meta.get("storage", {}).get("scale"), meta.get("storage", {}).get("offset")
    return np.array(meta["affine"], dtype=np.float64), None if scaling[0] is None else scaling


def _entry_affine(directory: Path) -> np.ndarray:
    return _entry_geometry(directory)[0]


def decode_voxels(stored: torch.Tensor | np.ndarray, image_path: str | os.PathLike) -> torch.Tensor:
    """Float32 intensities of voxels read from a cached image (any :data:`STORAGE_FORMATS`).

    float32 comes back as it is (a view, no copy); float16 is widened, int16 rescaled with its
    entry's scale and offset. Only the voxels given are converted, so decode patches, not volumes.
    """
    tensor = torch.as_tensor(stored)
    if tensor.dtype == torch.float32:
        return tensor
    # torch, not NumPy: NumPy widens float16 in scalar code (~1.8 ms per 96³ patch on one core),
    # torch with the CPU's vector conversion instructions (~0.4 ms).
    decoded = tensor.to(torch.float32)
    scaling = _entry_geometry(Path(image_path).parent)[1]
    if scaling is not None:
        decoded.mul_(scaling[0]).add_(scaling[1])
    return decoded


def encode_voxels(array: np.ndarray, storage: CacheStorage, where: Path) -> tuple[np.ndarray, dict]:
    """(stored array, ``meta.json``'s ``storage`` description) of float32 intensities; see :data:`STORAGE_FORMATS`.

    For a ``*_blosc2`` format the array is that of the format before the suffix (compression is lossless).
    """
    if storage.endswith(COMPRESSION_SUFFIX) and storage in STORAGE_FORMATS:
        stored, description = encode_voxels(array, storage.removesuffix(COMPRESSION_SUFFIX), where)
        return stored, {**description, "compression": BLOSC2_DESCRIPTION}
    if storage == "float32":
        return array, {"dtype": "float32"}
    if storage == "float16":
        limit = float(np.finfo(np.float16).max)
        if float(np.abs(array).max(initial=0.0)) > limit:
            raise DataSourceError(f"{where}: preprocessed intensities exceed float16's range (+-{limit:g}); "
                                  "use cache_storage int16 or float32")
        return array.astype(np.float16), {"dtype": "float16"}
    if storage == "int16":
        low, high = float(array.min()), float(array.max())
        scale = (high - low) / 65535.0 if high > low else 1.0
        offset = low + 32768.0 * scale  # stored -32768 is the minimum, 32767 the maximum
        levels = np.rint((array.astype(np.float64) - low) / scale) - 32768.0
        stored = np.clip(levels, -32768, 32767).astype(np.int16)
        return stored, {"dtype": "int16", "scale": scale, "offset": offset, "max_abs_error": scale / 2}
    raise ValueError(f"cache storage must be one of {STORAGE_FORMATS}, got {storage!r}")


@functools.lru_cache(maxsize=128)
def _memory_map(path: Path, inode: int, mtime_ns: int) -> np.ndarray:
    # One mapping per file and process, reused by every load of the volume: a fresh mapping would
    # page-fault on every page a patch touches again (measured: ~20 % of the queue's throughput).
    # Each mapping holds a file descriptor, hence the bound (128 of the usual 1024 per process).
    # Keyed by inode and mtime too, so an entry rebuilt in place is mapped afresh.
    return np.load(path, mmap_mode="c")


def compress(array: np.ndarray) -> bytes:
    """``array`` (C x I x J x K) as a Blosc2 frame (see :data:`STORAGE_FORMATS`).

    Small blocks let a patch read decompress only what it covers; one thread, as preprocessing runs
    in a pool.
    """
    import blosc2  # only runs with a compressed cache pay its import

    parameters = blosc2.CParams(codec=blosc2.Codec.LZ4, clevel=5, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    channels, *spatial = array.shape
    chunks = (channels, *(min(COMPRESSED_CHUNK, side) for side in spatial))
    blocks = (channels, *(min(COMPRESSED_BLOCK, side) for side in spatial))
    return blosc2.asarray(np.ascontiguousarray(array), cparams=parameters, chunks=chunks, blocks=blocks).to_cframe()


@functools.lru_cache(maxsize=128)
def _compressed_array(path: Path, inode: int, mtime_ns: int, process: int):
    # One open array per file and process (keyed by pid: a handle inherited through fork would share
    # the parent's file offset with its siblings), reused by every patch read of the volume.
    import blosc2

    return blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=1))


def open_compressed(path: str | os.PathLike):
    """The Blosc2 array of a compressed image, unread: slicing it decompresses only the blocks it covers."""
    path = Path(path)
    status = path.stat()
    return _compressed_array(path, status.st_ino, status.st_mtime_ns, os.getpid())


def decompress(path: Path) -> np.ndarray:
    """The whole array of a Blosc2 file written by :func:`compress`."""
    return open_compressed(path)[()]


def read_cached_array(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO ``reader`` for cached arrays: a memory map (a compressed image: its decompressed array)
    and the entry's affine.

    Copy-on-write mapping (``mmap_mode="c"``) rather than read-only, because torch refuses to wrap
    read-only NumPy arrays without a warning; nothing writes to it, so no page is ever copied (the
    mapping is shared by the loads of a volume in a process: patches are only read, then copied
    into batches). It lives at module level so DataLoader workers can unpickle subjects that refer
    to it.
    """
    path = Path(path)
    if path.name == COMPRESSED_IMAGE_FILE:
        return decompress(path), _entry_affine(path.parent)
    status = path.stat()
    return _memory_map(path, status.st_ino, status.st_mtime_ns), _entry_affine(path.parent)


def volume_subject(volume: CachedVolume, with_label: bool = False) -> tio.Subject:
    """A lazily loaded TorchIO subject (``image``, optional ``label``, ``case_id``) for a cached volume.

    Nothing is read until a sampler touches the data, and then only as a memory map, so these
    subjects are cheap to send to DataLoader workers and patches slice only what they need.
    """
    images: dict[str, tio.Image] = {"image": tio.ScalarImage(volume.image, reader=read_cached_array)}
    if with_label:
        if volume.label is None:
            raise DataSourceError(f"case {volume.case_id}: no label map was cached for it")
        images["label"] = tio.LabelMap(volume.label, reader=read_cached_array)
    return tio.Subject(**images, case_id=volume.case_id)


def attach_memory_maps(subject: tio.Subject) -> tio.Subject:
    """Give every not-yet-loaded image of ``subject`` its data through its reader, without copying.

    ``tio.Image.load()`` concatenates the per-path tensors with ``torch.cat`` even for a single
    path, which copies (so fully reads) the volume; setting the reader's memory-mapped tensor
    directly keeps the read lazy.

    A compressed image gets a placeholder of its shape and dtype that holds no voxels (a zero-stride
    view of one element): the samplers need only its shape, and :class:`MemoryMappedSampling` reads
    each patch from the file.
    """
    for image in subject.get_images(intensity_only=False):
        if dict.get(image, tio.DATA) is None:  # dict.get: Image.__getitem__ would load it
            if Path(image.path).name == COMPRESSED_IMAGE_FILE:
                stored = open_compressed(image.path)
                dtype = torch.from_numpy(np.empty(0, stored.dtype)).dtype
                tensor, affine = torch.zeros(1, dtype=dtype).expand(stored.shape), _entry_affine(Path(image.path).parent)
            else:
                tensor, affine = image.read_and_check(image.path)
            image.set_data(tensor)
            image.affine = affine
    return subject


class MemoryMappedSampling:
    """Mixin for TorchIO patch samplers over cached volumes: lazy reads, zero-copy patches.

    Before sampling it attaches memory maps (see :func:`attach_memory_maps`), and its ``crop``
    returns patches whose tensors are *views* of those maps instead of TorchIO's cloned copies (for a
    compact cache, the patch's voxels decoded to float32 - see :func:`decode_voxels`; for a compressed
    one, the patch's blocks decompressed):
    the queue then buffers only views, and the voxels are read once, when the collate function
    copies them into the batch. The maps are copy-on-write, so an in-place edit of a patch can
    never reach the cache files. Combine it with any ``tio`` sampler (e.g. ``tio.LabelSampler`` for
    segmentation).
    """

    def __call__(self, subject: tio.Subject, num_patches: int | None = None):
        return super().__call__(attach_memory_maps(subject), num_patches)

    def crop(self, subject: tio.Subject, index_ini, patch_size) -> tio.Subject:
        start = np.asarray(index_ini, dtype=np.int64)
        stop = start + np.asarray(patch_size, dtype=np.int64)
        window = (slice(None), *(slice(int(a), int(b)) for a, b in zip(start, stop)))
        fields = {}
        for key, value in subject.items():
            if isinstance(value, tio.Image):
                affine = value.affine.copy()
                affine[:3, 3] = value.affine[:3, :3] @ start + value.affine[:3, 3]
                if Path(value.path).name == COMPRESSED_IMAGE_FILE:
                    data = torch.from_numpy(open_compressed(value.path)[window])
                else:
                    data = value.data[window]
                if isinstance(value, tio.ScalarImage) and data.dtype != torch.float32:  # compact cache
                    data = decode_voxels(data, value.path)
                fields[key] = type(value)(tensor=data, affine=affine)
            else:
                fields[key] = value
        fields[tio.LOCATION] = torch.as_tensor([*start.tolist(), *stop.tolist()])
        return tio.Subject(fields)


class MemoryMappedUniformSampler(MemoryMappedSampling, tio.UniformSampler):
    """``tio.UniformSampler`` over memory-mapped cached volumes."""


def _geometry(image: tio.Image) -> dict:
    """Spatial metadata in TorchIO's RAS world convention."""
    return {
        "shape": list(image.spatial_shape),
        "spacing": list(image.spacing),
        "origin": [float(v) for v in image.origin],
        "direction": [float(v) for v in image.direction],
        "orientation": image.orientation_str,
        "affine": image.affine.tolist(),
    }


def _label_array(label: torch.Tensor, where: Path) -> np.ndarray:
    values = label.to(torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise DataSourceError(f"{where}: label map holds negative values (min {low})")
    dtype = np.uint8 if high <= np.iinfo(np.uint8).max else np.int16
    if high > np.iinfo(np.int16).max:
        raise DataSourceError(f"{where}: label values up to {high} exceed int16")
    return values.numpy().astype(dtype)


def preprocess_case(
    case: Case,
    preprocessing: Preprocessing,
    cache_dir: Path,
    channels: int = 1,
    checks: dict | None = None,
    storage: CacheStorage = "float32",
    image: tio.ScalarImage | None = None,
    label: tio.LabelMap | None = None,
) -> CachedVolume:
    """Preprocess and store one case; returns the new cache entry.

    ``image`` / ``label``: the case's volumes when the caller has decoded them already (the data
    checks do, see :mod:`data_modules.prepare`), so each file is read once; otherwise read here.
    ``checks`` is the case's result from :mod:`data_modules.validation`, stored in the sidecar's
    ``validation.checks`` so later runs need not re-check the unchanged files.
    """
    key = cache_key(case, preprocessing, channels, storage)
    image = read_image(case.image, channels=channels) if image is None else image
    images: dict[str, tio.Image] = {"image": image}
    if case.label is not None:
        label = read_label(case.label) if label is None else label
        if label.spatial_shape != image.spatial_shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            raise DataSourceError(
                f"{case.label}: label geometry differs from its image {case.image} "
                f"(shape {label.spatial_shape} vs {image.spatial_shape}, or a different affine)"
            )
        images["label"] = label
    original = _geometry(image)
    subject = preprocessing.apply(tio.Subject(**images))

    array = subject["image"].data.numpy().astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise DataSourceError(f"{case.image}: preprocessed image contains NaN or infinite values")
    stored, storage_meta = encode_voxels(array, storage, case.image)
    label_array = _label_array(subject["label"].data, case.label) if case.label is not None else None

    directory = entry_dir(cache_dir, case, key)
    directory.mkdir(parents=True, exist_ok=True)
    # The arrays' renames become durable with the folder's fsync after meta.json, written last.
    if storage_meta.get("compression"):
        image_path = atomic_write(directory / COMPRESSED_IMAGE_FILE, compress(stored), sync_folder=False)
    else:
        image_path = atomic_write(directory / IMAGE_FILE, lambda handle: np.save(handle, np.ascontiguousarray(stored)),
                                  sync_folder=False)
    if label_array is not None:
        atomic_write(directory / LABEL_FILE, lambda handle: np.save(handle, np.ascontiguousarray(label_array)),
                     sync_folder=False)
    processed = _geometry(subject["image"])
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "key": key,
        "case_id": case.case_id,
        "source": {"image": str(case.image), "label": None if case.label is None else str(case.label)},
        "preprocessing": preprocessing.to_dict(),
        "shape": list(array.shape),
        "dtype": str(stored.dtype),
        "storage": storage_meta,
        "label": None if label_array is None else {"file": LABEL_FILE, "dtype": str(label_array.dtype)},
        "affine": processed["affine"],
        "spacing": processed["spacing"],
        "orientation": processed["orientation"],
        "original": original,
        "validation": {
            "finite": True,
            "intensity": {
                "min": float(array.min()),
                "max": float(array.max()),
                "mean": float(array.mean()),
                "std": float(array.std()),
            },
            "label_voxels": None
            if label_array is None
            else {str(int(k)): int(n) for k, n in zip(*np.unique(label_array, return_counts=True))},
        },
    }
    if checks is not None:
        meta["validation"]["checks"] = checks
    atomic_write(directory / META_FILE, json.dumps(meta, indent=1))
    (directory / CHECKS_FILE).unlink(missing_ok=True)  # its content now lives in the sidecar
    label_path = directory / LABEL_FILE if label_array is not None else None
    return CachedVolume(case_id=case.case_id, image=image_path, label=label_path, meta=meta)


@contextlib.contextmanager
def entry_lock(directory: Path):
    """Hold the entry's writer lock (blocking): at most one process checks and writes an entry at a time.

    ``flock`` locks die with their process, so a killed writer never leaves the entry locked.
    """
    lock = directory.parent / LOCKS / f"{directory.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_entry(cache_root: Path, case: Case, preprocessing: Preprocessing, channels: int = 1,
               storage: CacheStorage = "float32") -> CachedVolume | None:
    """The finished cache entry of ``case``, or None (raises OSError when its sources cannot be stat'ed)."""
    return _load_entry(entry_dir(cache_root, case, cache_key(case, preprocessing, channels, storage)), case.case_id)


def _cache_or_report(case: Case, preprocessing: Preprocessing, cache_dir: Path, channels: int,
                     checks: dict | None, storage: CacheStorage) -> tuple[CachedVolume | str, bool]:
    """Worker: (the entry or a one-line reason it failed, whether this call wrote it)."""
    try:
        directory = entry_dir(cache_dir, case, cache_key(case, preprocessing, channels, storage))
        with entry_lock(directory):
            finished = _load_entry(directory, case.case_id)  # maybe by another writer meanwhile
            if finished is not None:
                return finished, False
            return preprocess_case(case, preprocessing, cache_dir, channels, checks, storage), True
    except (DataSourceError, PreprocessingError) as error:
        return str(error), False  # these messages already name the file
    except Exception as error:  # noqa: BLE001 - every bad case must be reported together, before training
        return f"{case.image}: {type(error).__name__}: {error}", False


Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


def map_cases(work: Callable[[Item], Outcome], items: Sequence[Item], num_workers: int = 0,
              progress: Callable[[int, int, float], None] | None = None) -> list[Outcome]:
    """``[work(item) for item in items]``, in a pool of ``num_workers`` threads when > 1.

    Threads, not processes: decoding (ITK, zlib), resampling (ITK) and NumPy release the GIL, and a
    thread starts in microseconds where a spawned process first spends seconds importing torch,
    TorchIO and SimpleITK (as much as a small corpus takes to preprocess). ``progress(done, total,
    seconds)`` is called after each item, in completion order.
    """
    start = time.monotonic()
    if num_workers <= 1 or len(items) <= 1:
        outcomes = []
        for item in items:
            outcomes.append(work(item))
            if progress is not None:
                progress(len(outcomes), len(items), time.monotonic() - start)
        return outcomes
    with ThreadPoolExecutor(min(num_workers, len(items)), thread_name_prefix="lmim-preprocess") as pool:
        futures = [pool.submit(work, item) for item in items]
        if progress is not None:
            for done, _ in enumerate(as_completed(futures), start=1):
                progress(done, len(items), time.monotonic() - start)
        return [future.result() for future in futures]


def log_progress(report: Callable[[str], None], every: int = 10, verb: str = "preprocessed"
                 ) -> Callable[[int, int, float], None]:
    """A ``progress`` callback for :func:`map_cases` that reports every ``every`` cases, with an ETA."""

    def progress(done: int, total: int, seconds: float) -> None:
        if done % max(every, 1) == 0 or done == total:
            eta = seconds / done * (total - done)
            report(f"{verb} {done}/{total} case(s) in {seconds:.1f} s" + (f", about {eta:.0f} s left" if done < total else ""))

    return progress


def ensure_cached(
    cases: Sequence[Case],
    preprocessing: Preprocessing,
    cache_dir: str | os.PathLike | None = None,
    channels: int = 1,
    num_workers: int = 0,
    log_every: int = 10,
    report: Callable[[str], None] = log.info,
    checks: Sequence[dict | None] | None = None,
    storage: CacheStorage = "float32",
) -> list[CachedVolume]:
    """Cache entries for all ``cases`` (same order), preprocessing the ones not cached yet.

    No data checks here (the data modules use :func:`data_modules.prepare.prepare_and_select`,
    which checks and preprocesses on one decode); ``checks`` (one per case, optional) are
    validation results stored with new entries. Misses run in ``num_workers`` threads
    (:func:`map_cases`). Every failing case is collected and reported in ONE
    :class:`DataSourceError` naming the file and the problem, so a bad dataset is rejected before
    training instead of mid-epoch.
    """
    if storage not in STORAGE_FORMATS:
        raise ValueError(f"cache storage must be one of {STORAGE_FORMATS}, got {storage!r}")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_root.mkdir(parents=True, exist_ok=True)
    results: dict[int, CachedVolume | str] = {}
    missing: list[int] = []
    for index, case in enumerate(cases):
        try:
            cached = load_entry(cache_root, case, preprocessing, channels, storage)
        except OSError as error:
            results[index] = f"{case.image}: cannot be inspected ({error})"
            continue
        if cached is None:
            missing.append(index)
        else:
            results[index] = cached
    if missing:
        report(f"preprocessing {len(missing)} of {len(cases)} case(s) into {cache_root}")
        outcomes = map_cases(
            lambda i: _cache_or_report(cases[i], preprocessing, cache_root, channels, checks[i] if checks else None,
                                       storage),
            missing, num_workers, log_progress(report, log_every))
        for index, (outcome, _) in zip(missing, outcomes):
            results[index] = outcome
    failures = [(cases[i], outcome) for i, outcome in sorted(results.items()) if isinstance(outcome, str)]
    if failures:
        lines = "\n".join(f"  - {case.case_id}: {problem}" for case, problem in failures)
        raise DataSourceError(f"{len(failures)} of {len(cases)} case(s) cannot be used:\n{lines}")
    return [results[i] for i in range(len(cases))]


def cached_validation(directory: Path) -> dict | None:
    """The validation result stored for a cache entry: the sidecar's ``validation.checks``, or the
    ``checks.json`` a check left before the case was preprocessed."""
    directory = Path(directory)
    for path, keys in ((directory / META_FILE, ("validation", "checks")), (directory / CHECKS_FILE, ())):
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, dict):
            return value
    return None


def record_validation(directory: Path, checks: dict) -> None:
    """Store ``checks`` with the entry (atomically): in its sidecar when it exists, else in ``checks.json``
    until :func:`preprocess_case` (given the same ``checks``) writes the sidecar."""
    directory = Path(directory)
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / CHECKS_FILE, json.dumps(checks, indent=1))
        return
    if (meta.get("validation") or {}).get("checks") != checks:
        meta.setdefault("validation", {})["checks"] = checks
        atomic_write(path, json.dumps(meta, indent=1))
