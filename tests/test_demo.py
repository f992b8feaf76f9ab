"""`python -m lightning_mim demo --fast`: pre-train → export → fine-tune (pre-trained and scratch) → test → compare."""

from lightning_mim.cli import main
from lightning_mim.segmentation.compare import MEAN_ROW
from lightning_mim.segmentation.weights import read_encoder_file


def test_fast_demo_runs_the_whole_transfer_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMIM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMIM_DATA_DIR", str(tmp_path / "phantoms"))
    assert main(["demo", "--fast", "true", "--output", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out

    demo = tmp_path / "demo"
    exported = read_encoder_file(demo / "pretrain" / "encoder.pt")  # by the export-encoder command
    assert exported.target == "unetr" and exported.method == "mae3d" and exported.meta["global_step"] == 2
    assert read_encoder_file(demo / "pretrain" / "lightning-mim" / "mae3d-pretrain" / "encoder.pt").meta["data"]  # callback
    for name in ("mae3d", "scratch"):
        assert (demo / "finetune" / "lightning-mim" / name / "test_metrics.csv").is_file()
    table = (demo / "comparison" / "comparison.csv").read_text()
    assert table.count("mae3d,") == 9 and table.count("scratch,") == 9  # 8 organs + the mean row each
    assert "| organ | mae3d | scratch |" in out and f"| **{MEAN_ROW} Dice** |" in out
    assert (demo / "comparison" / "dice_vs_label_fraction.png").is_file()
