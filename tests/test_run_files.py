"""Run files: atomic, fsync'ed writes (never half a file, no temporary left behind) and the run folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_mim import run_files
from lightning_mim.run_files import atomic_path, atomic_write, run_directory


def test_bytes_text_and_writer_functions_land_whole(tmp_path):
    assert atomic_write(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"  # folders created
    atomic_write(tmp_path / "t.csv", "x,y\r\n1,é\r\n")
    atomic_write(tmp_path / "f.bin", lambda handle: handle.write(b"abc"))
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.csv").read_bytes() == "x,y\r\n1,é\r\n".encode()  # line endings as given
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "f.bin", "t.csv"]


def test_a_reader_never_sees_a_partial_file_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write(target, b"old content")
    seen_during_write = []

    def dies_halfway(handle) -> None:
        handle.write(b"new con")
        handle.flush()
        seen_during_write.append(target.read_bytes())
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, dies_halfway)
    assert seen_during_write == [b"old content"]
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary is gone


def test_the_temporary_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination) -> None:
        events.append(("replace", str(source), str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(run_files.os, "fsync", fsync)
    monkeypatch.setattr(run_files.os, "replace", replace)
    target = tmp_path / "encoder.pt"
    atomic_write(target, b"weights")

    (_, synced), (_, moved, destination), (_, folder) = events
    assert synced == moved and Path(moved).parent == tmp_path and Path(moved).name.startswith(".encoder.pt.")
    assert Path(moved).name.endswith(".tmp")  # nothing globbing *.pt or *.ckpt mistakes it for a finished file
    assert destination == str(target) and folder == str(tmp_path)


def test_a_folder_that_cannot_be_fsynced_does_not_fail_the_write(tmp_path, monkeypatch):
    real_open = os.open

    def no_directory_handles(path, flags, *args):
        if Path(path).is_dir():
            raise OSError(22, "Invalid argument")  # as on some network file systems
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_files.os, "open", no_directory_handles)
    atomic_write(tmp_path / "metrics.csv", "a\n")
    assert (tmp_path / "metrics.csv").read_text() == "a\n"


def test_permissions_follow_the_umask_like_an_ordinary_file(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "encoder.pt", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "encoder.pt").stat().st_mode) == 0o644


def test_atomic_path_keeps_suffixes_for_writers_that_pick_the_format_from_the_name(tmp_path):
    target = tmp_path / "case.nii.gz"
    with atomic_path(target, keep_suffixes=True) as temporary:
        assert temporary.name.endswith(".tmp.nii.gz") and temporary.parent == tmp_path
        temporary.write_bytes(b"image")
        assert not target.exists()
    assert target.read_bytes() == b"image"

    with pytest.raises(RuntimeError), atomic_path(target, keep_suffixes=True) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"image" and [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_run_directory_is_the_logger_folder_or_the_root(tmp_path):
    logged = L.Trainer(logger=CSVLogger(tmp_path / "runs", name="lightning-mim", version="abc123"),
                       default_root_dir=tmp_path / "root", enable_progress_bar=False, enable_model_summary=False)
    assert run_directory(logged) == tmp_path / "runs" / "lightning-mim" / "abc123"
    numbered = L.Trainer(logger=CSVLogger(tmp_path / "runs", name="x", version=3), enable_progress_bar=False)
    assert run_directory(numbered) == tmp_path / "runs" / "x" / "version_3"
    bare = L.Trainer(logger=False, default_root_dir=tmp_path / "root", enable_progress_bar=False)
    assert run_directory(bare) == tmp_path / "root"
