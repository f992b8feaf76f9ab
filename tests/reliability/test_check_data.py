"""``python -m lightning_mim check-data``: the same configs as ``fit``, a table, an exit code, cached results."""

from __future__ import annotations

import json
import os

import pytest
from bad_inputs import CORPUS, combined
from reliability_probes import REPO

import data_modules.validation as validation
from data_modules import PretrainDataModule
from data_modules.cache import META_FILE
from lightning_mim.cli import main
from lightning_mim.reliability.check_data import data_module_from_args

MAE = ["--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml")]


def test_bad_cases_give_a_table_with_every_problem_and_exit_code_1(tmp_path, capsys):
    entries = [e for e in CORPUS if e.level == "case" and not e.labels and not e.skip_as_root]
    path, built = combined(entries, tmp_path / "data")
    report = tmp_path / "report.json"

    code = main(["check-data", *MAE, "--data.init_args.datalist", str(path),
                 "--data.init_args.cache_dir", str(tmp_path / "cache"), "--json", str(report)])

    out = capsys.readouterr().out
    assert code == 1
    assert f"2 of {len(built) + 2} case(s) ok, {len(built)} bad" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith((" ", "-", "case"))}
    assert "ok" in rows["good_0"] and "ok" in rows["good_1"]
    for name, dataset in built.items():
        assert "BAD" in rows[name], name
        assert f"    ! {dataset.bad_file}: " in out
    cases = {case["case_id"]: case for case in json.loads(report.read_text())["cases"]}
    assert not cases["good_0"]["problems"] and all(cases[name]["problems"] for name in built)


def test_good_cases_pass_and_later_runs_reuse_the_cached_results(tmp_path, capsys, monkeypatch):
    args = [*MAE, "--data.init_args.phantom_root", str(tmp_path / "phantoms"),
            "--data.init_args.cache_dir", str(tmp_path / "cache")]
    assert main(["check-data", *args]) == 0
    assert "3 of 3 case(s) ok, 0 bad" in capsys.readouterr().out

    assert main(["check-data", *args]) == 0
    assert capsys.readouterr().out.count("ok (cached)") == 3

    # fit's own checks (data module set-up) reuse them too - nothing is read again - and the
    # sidecar of each new cache entry keeps them
    def must_not_run(case, settings):
        raise AssertionError(f"{case.case_id} was checked again")

    monkeypatch.setattr(validation, "validate_case", must_not_run)
    module = data_module_from_args(args)
    module.setup()
    for volume in module.train_volumes + module.val_volumes:
        checks = json.loads((volume.image.parent / META_FILE).read_text())["validation"]["checks"]
        assert checks["ok"] and checks["fingerprint"] == module.validation_settings().fingerprint()


def test_a_changed_file_is_checked_again(tmp_path, capsys):
    entry = next(e for e in CORPUS if e.name == "nan_voxels")
    dataset = entry.build(tmp_path / "data")
    good = tmp_path / "data" / "images" / "good_0.nii.gz"
    args = ["check-data", *MAE, *dataset.args, "--data.init_args.cache_dir", str(tmp_path / "cache")]
    assert main(args) == 1
    assert main(args) == 1
    assert capsys.readouterr().out.count("ok (cached)") == 2  # the two good cases, the second time

    os.utime(good, ns=(0, 0))  # a touched source file gets a new cache key
    assert main(args) == 1
    out = capsys.readouterr().out
    assert out.count("ok (cached)") == 1 and "NaN" in out


def test_a_broken_source_is_reported_with_exit_code_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["check-data", *MAE, "--data.init_args.folder", str(tmp_path / "empty")]) == 1
    assert f"{tmp_path / 'empty'}: folder is empty" in capsys.readouterr().err


def test_on_bad_case_is_validated_at_construction():
    with pytest.raises(ValueError, match="on_bad_case must be one of"):
        PretrainDataModule(on_bad_case="ignore")


def test_plausibility_limits_are_configurable_from_the_config(tmp_path, capsys):
    dataset = next(e for e in CORPUS if e.name == "too_small_for_the_roi").build(tmp_path / "data")
    args = ["check-data", *MAE, *dataset.args, "--data.init_args.cache_dir", str(tmp_path / "cache")]
    assert main(args) == 1
    assert main([*args, "--data.init_args.validation_limits.min_roi_fraction", "0.1"]) == 0
    assert "3 of 3 case(s) ok" in capsys.readouterr().out
