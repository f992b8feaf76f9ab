"""The comparison command: many runs → one method × label fraction × organ table and a Dice-vs-fraction plot."""

import json
import math

import pytest

from lightning_mim.cli import main
from lightning_mim.segmentation.compare import MEAN_ROW, collect_runs, compare
from lightning_mim.segmentation.evaluation import metric_rows, write_metrics_csv

ORGANS = ["background", "liver", "spleen"]


def write_run(folder, method, fraction, dice_per_case, dataset="BTCV/dataset_0.json", organs=ORGANS):
    results = [{"case_id": f"c{i}", "dice": list(d), "hd95": [1.0] * len(d)} for i, d in enumerate(dice_per_case)]
    rows = metric_rows(results, organs, dataset=dataset, method=method, label_fraction=fraction,
                       num_labelled=int(fraction * 20), seed=0)
    return write_metrics_csv(rows, folder / "test_metrics.csv")


@pytest.fixture()
def runs(tmp_path):
    write_run(tmp_path / "mae_10", "mae3d", 0.1, [(0.6, 0.4), (0.8, 0.6)])
    write_run(tmp_path / "mae_50", "mae3d", 0.5, [(0.9, 0.7), (0.9, 0.9)])
    write_run(tmp_path / "scratch_10", "scratch", 0.1, [(0.5, 0.1), (0.5, float("nan"))])
    write_run(tmp_path / "scratch_50_seed1", "scratch", 0.5, [(0.8, 0.6)])
    write_run(tmp_path / "scratch_50_seed2", "scratch", 0.5, [(0.6, 0.4)])
    return tmp_path


def cell(rows, method, fraction, organ):
    (row,) = [r for r in rows if (r["method"], r["label_fraction"], r["organ"]) == (method, fraction, organ)]
    return row


def test_table_averages_cases_then_runs(runs):
    result = compare([runs], runs / "out")
    rows = result.rows
    assert cell(rows, "mae3d", 0.1, "liver")["dice_mean"] == pytest.approx(0.7)
    assert cell(rows, "mae3d", 0.1, "liver")["dice_std"] == pytest.approx(0.1)  # one run: spread over cases
    assert cell(rows, "mae3d", 0.1, MEAN_ROW)["dice_mean"] == pytest.approx(0.6)
    assert cell(rows, "scratch", 0.1, "spleen")["dice_mean"] == pytest.approx(0.1)  # NaN case skipped
    two_seeds = cell(rows, "scratch", 0.5, "liver")
    assert two_seeds["runs"] == 2 and two_seeds["dice_mean"] == pytest.approx(0.7) and two_seeds["dice_std"] == pytest.approx(0.1)
    assert cell(rows, "mae3d", 0.5, MEAN_ROW)["num_labelled"] == 10


def test_outputs_side_by_side_markdown_csv_and_plot(runs):
    result = compare([runs / "mae_10" / "test_metrics.csv", runs / "scratch_10"], runs / "out")
    assert "## BTCV/dataset_0.json: label fraction 0.1 (2 labelled case(s))" in result.markdown
    assert "| organ | mae3d | scratch |" in result.markdown
    assert "| liver | 0.7000 ± 0.100 | 0.5000 ± 0.000 |" in result.markdown
    assert "background excluded" in result.markdown
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot.stat().st_size > 5000
    header = result.csv.read_text().splitlines()[0]
    assert header == "dataset,method,label_fraction,num_labelled,organ,dice_mean,dice_std,runs,cases"


def test_runs_of_different_data_sets_stay_apart(tmp_path):
    write_run(tmp_path / "btcv", "scratch", 0.5, [(0.8, 0.6)])
    write_run(tmp_path / "amos", "scratch", 0.5, [(0.4, 0.2)], dataset="AMOS/dataset.json")
    result = compare([tmp_path], tmp_path / "out")
    means = {r["dataset"]: r["dice_mean"] for r in result.rows if r["organ"] == MEAN_ROW}
    assert means == {"BTCV/dataset_0.json": pytest.approx(0.7), "AMOS/dataset.json": pytest.approx(0.3)}
    assert "## AMOS/dataset.json: label fraction 0.5" in result.markdown
    assert "## BTCV/dataset_0.json: label fraction 0.5" in result.markdown


def test_the_data_set_of_an_older_csv_comes_from_the_run_config_beside_it(tmp_path):
    import csv

    path = write_run(tmp_path / "run", "scratch", 0.5, [(0.8, 0.6)])
    rows = list(csv.DictReader(path.open()))
    with path.open("w", newline="") as handle:  # a CSV written before the dataset column existed
        writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != "dataset"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "run" / "lightning_config.yaml").write_text(
        "data:\n  class_path: data_modules.segmentation.SegmentationDataModule\n"
        "  init_args:\n    folder: /data/hospital_a/ct\n")
    (run,) = collect_runs([tmp_path / "run"])
    assert run.dataset == "hospital_a/ct"


def test_runs_whose_organs_differ_are_never_averaged(tmp_path, capsys):
    write_run(tmp_path / "seed1", "scratch", 0.5, [(0.8, 0.6)])
    write_run(tmp_path / "seed2", "scratch", 0.5, [(0.8, 0.6)], organs=["background", "liver", "kidney"])
    with pytest.raises(ValueError, match=r"refusing to average runs of 'BTCV/dataset_0.json', method 'scratch', "
                                         r"label fraction 0.5 whose organs differ: .*liver, spleen; .*liver, kidney"):
        compare([tmp_path], tmp_path / "out")
    assert main(["compare", str(tmp_path), "--output", str(tmp_path / "cli")]) == 1
    assert "compare: refusing to average runs" in capsys.readouterr().err


def test_a_csv_linked_into_a_wandb_folder_is_counted_once(runs):
    files = runs / "wandb" / "offline-run-x" / "files"
    files.mkdir(parents=True)
    (files / "test_metrics.csv").symlink_to(runs / "mae_10" / "test_metrics.csv")
    assert len([r for r in collect_runs([runs]) if r.method == "mae3d" and r.label_fraction == 0.1]) == 1


def test_wandb_summaries_are_read_when_a_folder_has_no_csv(tmp_path):
    files = tmp_path / "run-abc" / "files"
    files.mkdir(parents=True)
    (files / "wandb-summary.json").write_text(json.dumps(
        {"test/dice/liver": 0.8, "test/dice/spleen": 0.6, "test/method": "smit", "test/label_fraction": 0.25,
         "test/num_labelled": 5, "train/loss": 0.1}))
    (run,) = collect_runs([tmp_path])
    assert run.method == "smit" and run.label_fraction == 0.25 and run.organ_dice == {"liver": 0.8, "spleen": 0.6}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no test_metrics.csv"):
        collect_runs([tmp_path / "empty"])


def test_command_line_with_offline_wandb(runs, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["compare", str(runs / "mae_10"), str(runs / "scratch_10"), "--output", str(runs / "cli"), "--wandb", "true"]) == 0
    out = capsys.readouterr().out
    assert "| **mean Dice** |" in out and (runs / "cli" / "comparison.md").is_file()
    assert list((runs / "cli" / "wandb").glob("offline-run-*"))
    assert not math.isnan(float((runs / "cli" / "comparison.csv").read_text().splitlines()[1].split(",")[5]))
