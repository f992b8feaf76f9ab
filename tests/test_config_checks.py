"""Configuration mistakes are one-line errors naming the argument and the fix, before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_mim.cli import main

REPO = Path(__file__).resolve().parent.parent


def _configs(*names: str) -> list[str]:
    return [word for name in names for word in ("--config", str(REPO / name))]


SMIT = _configs("experiments/smit.yaml", "tests/configs/smit_tiny.yaml")
MAE = _configs("experiments/mae.yaml", "tests/configs/mae_tiny.yaml")
FINETUNE = _configs("experiments/finetune_phantoms.yaml", "tests/configs/finetune_tiny.yaml")
BTCV = _configs("experiments/finetune_btcv.yaml")


@pytest.fixture(autouse=True)
def _nothing_is_built(monkeypatch):
    """A check that lets the configuration through would build the model: fail loudly instead."""
    from lightning_mim.cli import MIMCLI

    def built(self):
        raise AssertionError("the configuration passed the checks and instantiation started")

    monkeypatch.setattr(MIMCLI, "instantiate_classes", built)


def _errors(args: list[str], capsys) -> list[str]:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("lightning_mim: error: ")]


@pytest.mark.parametrize(("args", "message"), [
    (["fit", *SMIT, "--data.view_size", "64"],
     "data.view_size 64 does not fit inside data.patch_size 48: set --data.view_size to at most 48"),
    (["fit", *SMIT, "--model.img_size", "48", "--data.view_size", "48", "--data.patch_size", "64"],
     "model.img_size 48: Swin encoders need every side divisible by 32; use e.g. 64"),
    (["fit", *SMIT, "--data.num_views", "1"],
     "SMIT compares two views of each patch: set --data.num_views 2 and --data.view_size"),
    (["fit", *MAE, "--data.patch_size", "48"],
     "model.img_size 32 differs from data.patch_size 48; they must change together: set --model.img_size 48"),
    (["fit", *MAE, "--data.patch_size", "40", "--model.img_size", "40"],
     "model.img_size 40 is not a whole number of 16³ ViT token patches (model.patch_size); use e.g. 48"),
    (["fit", *FINETUNE, "--model.roi_size", "48"],
     "model.roi_size 48 differs from data.patch_size 32; they must change together: set --model.roi_size 32"),
    (["fit", *BTCV, "--model.roi_size", "80", "--data.patch_size", "80", "--data.datalist", "{datalist}"],
     "model.roi_size 80: the swin_unetr network needs every side divisible by 32; use e.g. 96"),
    (["fit", *FINETUNE, "--model.num_classes", "3"],
     "model.num_classes 3 but the phantom cohort's organs give 9 classes (background included): set --model.num_classes 9"),
    (["fit", *FINETUNE, "--data.datalist", "{datalist}"],
     "model.num_classes 9 but the 'labels' of {datalist} give 3 classes (background included): set --model.num_classes 3"),
    (["fit", *FINETUNE, "--model.pretrained", "{missing}"],
     "model.pretrained: {missing}: encoder file does not exist"),
])
def test_a_mistake_is_one_line_naming_the_argument_and_the_fix(args, message, tmp_path, capsys):
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "spleen"},
                                    "training": [{"image": "a.nii.gz", "label": "a_label.nii.gz"}]}))
    names = {"datalist": str(datalist), "missing": str(tmp_path / "missing.pt")}
    errors = _errors([a.format(**names) for a in args], capsys)
    expected = f"lightning_mim: error: {message.format(**names)}"
    assert any(line.startswith(expected) for line in errors), errors


def test_a_configuration_that_fits_passes_the_checks(capsys):
    with pytest.raises(AssertionError, match="passed the checks"):
        main(["fit", *FINETUNE])


def test_from_the_command_line_the_error_is_printed_without_a_traceback(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lightning_mim", "fit", *SMIT, "--data.view_size", "64",
                             "--trainer.default_root_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "lightning_mim: error: data.view_size 64 does not fit inside data.patch_size 48" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
