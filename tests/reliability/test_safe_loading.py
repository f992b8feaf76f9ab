"""Checkpoints and exported encoders: written atomically, plain content, clear errors on damage, and
pickled objects refused (never executed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from reliability_probes import REPO

from lightning_mim.cli import main
from lightning_mim.methods.mae import MAE3D
from lightning_mim.reliability.checkpoint_io import AtomicCheckpointIO, CheckpointFileError
from lightning_mim.segmentation.weights import (
    FORMAT,
    EncoderFileError,
    export_module,
    read_encoder_file,
    read_pretrained,
    save_encoder,
)

PLAIN = (str, int, float, bool, type(None))


class RunsOnUnpickling:
    """Unpickling this creates a folder: proof, if it exists, that a loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MAE3D(img_size=32, embed_dim=48, depth=12, num_heads=4, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    return save_encoder(export_module(model, data={"modality": "ct"}), tmp_path_factory.mktemp("enc") / "encoder.pt")


@pytest.fixture
def checkpoint_file(tmp_path) -> Path:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(64, 64)}, "global_step": 3}, path)
    return path


def assert_plain(value, where: str = "payload") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: key {key!r}"
            assert_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            assert_plain(item, f"{where}[{index}]")
    else:
        assert isinstance(value, (torch.Tensor, *PLAIN)), f"{where} is a {type(value).__name__}"


def test_exported_encoder_holds_only_tensors_and_plain_metadata(encoder_file):
    payload = torch.load(encoder_file, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT
    assert_plain(payload)
    assert not list(encoder_file.parent.glob(".*.tmp"))


@pytest.mark.parametrize("writer", ["encoder", "checkpoint"])
def test_a_write_interrupted_midway_leaves_the_previous_file_intact(writer, encoder_file, tmp_path, monkeypatch):
    target = tmp_path / ("encoder.pt" if writer == "encoder" else "last.ckpt")
    file = read_encoder_file(encoder_file)

    def write() -> None:
        if writer == "encoder":
            save_encoder(file, target)
        else:
            AtomicCheckpointIO().save_checkpoint({"state_dict": file.state_dict, "global_step": 1}, target)

    write()
    before = target.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.seek(len(before) // 2)
        handle.truncate()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        write()

    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left behind


def test_truncated_encoder_and_checkpoint_fail_with_the_file_named(encoder_file, checkpoint_file, tmp_path):
    cut = tmp_path / "cut_encoder.pt"
    cut.write_bytes(encoder_file.read_bytes()[: encoder_file.stat().st_size // 2])
    with pytest.raises(EncoderFileError, match=f"{cut}: not a readable encoder file, it may be truncated or corrupt"):
        read_encoder_file(cut)

    checkpoint_file.write_bytes(checkpoint_file.read_bytes()[:-300])
    with pytest.raises(CheckpointFileError, match=f"{checkpoint_file}: not a readable checkpoint, it is truncated"):
        AtomicCheckpointIO().load_checkpoint(checkpoint_file)


@pytest.mark.timeout(300)
def test_resuming_from_a_truncated_checkpoint_through_the_cli_names_it(checkpoint_file, tmp_path):
    checkpoint_file.write_bytes(checkpoint_file.read_bytes()[:-300])
    with pytest.raises(CheckpointFileError, match=f"{checkpoint_file}: not a readable checkpoint.*--auto_resume false"):
        main(["fit", "--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml"),
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
              "--ckpt_path", str(checkpoint_file)])


def test_pickled_objects_are_refused_and_never_executed(encoder_file, tmp_path):
    marker = tmp_path / "code-was-executed"
    payload = torch.load(encoder_file, weights_only=True)
    evil_encoder = tmp_path / "encoder.pt"
    torch.save({**payload, "meta": {**payload["meta"], "note": RunsOnUnpickling(marker)}}, evil_encoder)
    evil_checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"x": RunsOnUnpickling(marker)}}, evil_checkpoint)

    with pytest.raises(EncoderFileError, match=f"{evil_encoder}: holds objects other than tensors and plain values"):
        read_encoder_file(evil_encoder)
    with pytest.raises(EncoderFileError, match=f"{evil_checkpoint}: not a readable Lightning checkpoint"):
        read_pretrained(evil_checkpoint)  # fine-tuning from a pre-training checkpoint
    with pytest.raises(CheckpointFileError, match=f"{evil_checkpoint}: refused"):
        AtomicCheckpointIO().load_checkpoint(evil_checkpoint)  # resuming
    assert not marker.exists()
