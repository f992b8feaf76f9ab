"""`python -m lightning_mim demo --fast`: the short study end to end — pre-train, export, probe and fine-tune vs scratch."""

import json

from lightning_mim.cli import main
from lightning_mim.segmentation.weights import read_encoder_file


def test_fast_demo_prints_the_per_organ_comparison_with_confidence_intervals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMIM_DATA_DIR", str(tmp_path / "phantoms"))
    assert main(["demo", "--fast", "true", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out

    demo = tmp_path / "demo"
    exported = read_encoder_file(next(demo.glob("pretrain/mae3d-*/encoder.pt")))  # by the EncoderExport callback
    assert exported.target == "unetr" and exported.method == "mae3d" and exported.meta["global_step"] == 2
    assert "ETA" in out and "pre-train mae3d: done" in out
    assert "| frozen probe (1 labelled) | liver |" in out and "| fine-tune, 1 labelled | pancreas |" in out
    rows = json.loads((demo / "report" / "study.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"mae3d"} and all(r["seeds"] == 2 for r in rows)
