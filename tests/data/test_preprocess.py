"""``python -m lightning_mim preprocess`` and the one-decode preparation behind it (data_modules.prepare)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from volume_files import ct_volume, write_image

from data_modules import PretrainDataModule
from data_modules.cache import IMAGE_FILE, META_FILE
from data_modules.phantoms import ensure_phantom_cohort
from data_modules.prepare import prepare_cases, shard_cases
from data_modules.presets import preset
from data_modules.sources import Case, DataSourceError
from data_modules.validation import ValidationSettings
from lightning_mim.cli import main
from lightning_mim.preprocess import parse_shard
from lightning_mim.reliability.check_data import data_module_from_args

REPO = Path(__file__).resolve().parents[2]
MAE = ["--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml")]


def args_for(tmp_path: Path) -> list[str]:
    return [*MAE, "--data.init_args.phantom_root", str(tmp_path / "phantoms"),
            "--data.init_args.cache_dir", str(tmp_path / "cache")]


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_shards_are_disjoint_cover_every_case_and_follow_the_slurm_array():
    cases = [Case(f"case_{i:02d}", Path(f"/data/{i}.nii.gz")) for i in (3, 1, 4, 0, 2)]
    shards = [shard_cases(cases, i, 2) for i in range(2)]
    assert [c.case_id for c in shards[0]] == ["case_00", "case_02", "case_04"]
    assert sorted(c.case_id for shard in shards for c in shard) == sorted(c.case_id for c in cases)
    assert shard_cases(list(reversed(cases)), 1, 2) == shards[1]  # independent of the discovery order

    assert parse_shard("1/4", {}) == (1, 4)
    assert parse_shard(None, {}) == (0, 1)
    array = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard(None, array) == (1, 3)
    assert parse_shard("0/2", array) == (0, 2)  # an explicit shard wins
    for bad in ("2/2", "1-2", "0/0"):
        with pytest.raises(SystemExit, match="--shard"):
            parse_shard(bad, {})


def test_preprocess_fills_the_cache_reruns_do_only_what_is_missing_and_fit_reads_nothing(tmp_path, capsys,
                                                                                         monkeypatch):
    args = args_for(tmp_path)
    assert main(["preprocess", *args, "--no-progress"]) == 0
    assert "3 case(s): 3 preprocessed, 0 already cached, 0 bad" in capsys.readouterr().out
    assert len(entries(tmp_path / "cache")) == 3

    removed = entries(tmp_path / "cache")[0]
    for path in removed.iterdir():
        path.unlink()
    assert main(["preprocess", *args, "--no-progress"]) == 0
    assert "3 case(s): 1 preprocessed, 2 already cached, 0 bad" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("fit preprocessed or decoded a case the preprocess command had cached")

    monkeypatch.setattr("data_modules.prepare.preprocess_case", must_not_run)
    monkeypatch.setattr("data_modules.prepare.inspect_case", must_not_run)
    module = data_module_from_args(args)
    module.setup("fit")
    assert sorted(v.image.parent for v in module.train_volumes + module.val_volumes) == entries(tmp_path / "cache")


@pytest.mark.timeout(300)
def test_two_concurrent_processes_fill_one_cache_without_writing_an_entry_twice(tmp_path):
    ensure_phantom_cohort(tmp_path / "phantoms", 3, (64, 64, 32), seed=0)  # what both would generate
    command = [sys.executable, "-m", "lightning_mim", "preprocess", *args_for(tmp_path), "--no-progress"]
    processes = [subprocess.Popen([*command, "--json", str(tmp_path / f"writer{i}.json")], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=280)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs

    reports = [json.loads((tmp_path / f"writer{i}.json").read_text())["cases"] for i in range(2)]
    written = [case["case_id"] for report in reports for case in report if case["action"] == "written"]
    assert sorted(written) == sorted(case["case_id"] for case in reports[0])  # each entry written exactly once
    assert [c["entry"] for c in reports[0]] == [c["entry"] for c in reports[1]]  # both use the same entries
    for entry in entries(tmp_path / "cache"):
        assert sorted(p.name for p in entry.iterdir()) == [IMAGE_FILE, META_FILE]  # no temporaries left
        meta = json.loads((entry / META_FILE).read_text())
        assert meta["validation"]["checks"]["ok"]
        assert np.load(entry / IMAGE_FILE, mmap_mode="r").shape == tuple(meta["shape"])
    assert len(entries(tmp_path / "cache")) == 3


def mri_cases(tmp_path: Path) -> list[str]:
    """Two MRI-like cases: a good one, and one whose non-zero voxels all hold the same value - it passes the
    data checks (not constant, has foreground, not integer-valued like a label map) but z-scoring its
    foreground is impossible."""
    rng = np.random.default_rng(0)
    good = np.zeros((24, 24, 24), np.float32)
    good[4:20, 4:20, 4:20] = rng.uniform(1.0, 2.0, (16, 16, 16))
    flat = np.zeros((24, 24, 24), np.float32)
    flat[4:20, 4:20, 4:20] = 5.25
    paths = [write_image(tmp_path / "mri" / f"{name}.nii.gz", array) for name, array in
             (("good", good), ("flat", flat))]
    csv = tmp_path / "cases.csv"
    csv.write_text("image,case_id\n" + "".join(f"{p},{p.name.split('.')[0]}\n" for p in paths))
    return [str(csv), str(paths[1])]


@pytest.mark.parametrize("on_bad_case", ["error", "skip"])
def test_a_case_failing_in_preprocessing_after_passing_the_checks_is_a_bad_case(tmp_path, on_bad_case):
    csv, flat = mri_cases(tmp_path)
    module = PretrainDataModule(csv=csv, preprocessing="mri_zscore", patch_size=16, val_fraction=0.0,
                                cache_dir=str(tmp_path / "cache"), on_bad_case=on_bad_case)
    if on_bad_case == "error":
        with pytest.raises(DataSourceError, match=r"^1 of 2 case\(s\) cannot be used") as error:
            module.setup("fit")
        assert f"{flat}: z-score impossible" in str(error.value)
        return
    module.setup("fit")
    assert [v.case_id for v in module.train_volumes] == ["good"]
    (skipped,) = module.skipped_cases
    assert skipped["case_id"] == "flat" and skipped["problems"][0].startswith(f"{flat}: z-score impossible")


def test_a_cold_preparation_inflates_every_file_once(tmp_path, inflations):
    """Checks (completeness, header, voxels, labels) and preprocessing share one inflate per file;
    a float image too (NaN / Inf checks), an int16 one, and their label maps."""
    cases = []
    for index, dtype in enumerate((np.int16, np.float32)):
        volume = ct_volume((40, 36, 24), seed=index)
        cases.append(Case(f"case_{index}", write_image(tmp_path / f"image_{index}.nii.gz", volume.astype(dtype)),
                          write_image(tmp_path / f"label_{index}.nii.gz", (volume > 0).astype(np.uint8))))
    preprocessing = preset("ct_abdomen_btcv")
    settings = ValidationSettings.for_preprocessing(preprocessing, roi_size=(16, 16, 16), num_classes=2)

    outcomes = prepare_cases(cases, settings, preprocessing, tmp_path / "cache")

    assert [outcome.action for outcome in outcomes] == ["written", "written"]
    for case in cases:
        for path in (case.image, case.label):
            assert inflations(path) == pytest.approx(1.0, abs=0.02), path
