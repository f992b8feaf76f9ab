"""Files a run leaves behind: written whole or not at all, and the folder they go to.

Every file another process may read while it is being written, or that a killed job may leave
half-written — checkpoints, exported encoders, cache entries, metric tables, predictions, the
run-id file — goes through :func:`atomic_write` (or :func:`atomic_path` for writers that take a
file name): the content goes to a temporary beside the target, is flushed and ``fsync``'ed, then
``os.replace``'d over the target, and the folder is ``fsync``'ed so the rename itself survives a
power cut. A reader sees the old file or the new one, never a part; a failed write removes its
temporary and leaves the old file untouched. The temporary lives in the target's folder, never in
the system temp folder: a rename across file systems would be a copy, and not atomic.

This module imports nothing from the project, so every layer (data modules included) may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L

#: What :func:`atomic_write` writes: bytes, text (encoded), or a function that writes into a binary handle.
Content = bytes | str | Callable[[IO[bytes]], object]


def _create_temporary(path: Path, keep_suffixes: bool) -> Path:
    """A new, empty, hidden file beside ``path`` (permissions as ``open`` gives them, under the umask)."""
    suffix = "".join(path.suffixes) if keep_suffixes else ""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it (not on Windows or some network file systems)."""
    try:
        _fsync_path(folder)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffixes: bool = False, sync_folder: bool = True) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    For writers that take a file name rather than a handle. ``keep_suffixes``: the temporary ends
    in ``path``'s suffixes (``.nii.gz``), for writers that choose the format from the name; by
    default it ends in ``.tmp``, so nothing that lists ``*.ckpt`` or ``*.pt`` mistakes it for a
    finished file. On an exception the temporary is removed and ``path`` keeps its old content.
    ``sync_folder=False`` leaves the folder's ``fsync`` to a later write into the same folder (a
    cache entry syncs its folder once, after its last file), saving one ``fsync`` per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _create_temporary(path, keep_suffixes)
    try:
        yield temporary
        _fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        _fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, content: Content, encoding: str = "utf-8", sync_folder: bool = True) -> Path:
    """Replace ``path`` with ``content`` atomically and durably; returns ``path``.

    ``content`` is bytes, text (written with ``encoding``, line endings as given), or a function
    that writes into a binary handle (``lambda handle: torch.save(obj, handle)``); ``sync_folder``:
    see :func:`atomic_path`.
    """
    path = Path(path)
    with atomic_path(path, sync_folder=sync_folder) as temporary, open(temporary, "wb") as handle:
        if callable(content):
            content(handle)
        else:
            handle.write(content.encode(encoding) if isinstance(content, str) else content)
    return path


def run_directory(trainer: L.Trainer) -> Path:
    """The per-run folder ``<save_dir>/<name>/<version>`` (where ModelCheckpoint puts ``checkpoints/``).

    Without a logger it is the trainer's ``default_root_dir``.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
    return Path(trainer.default_root_dir)
