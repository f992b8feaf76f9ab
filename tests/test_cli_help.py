"""What the command line tells: every command in --help, the program name users type, quiet consoles,
and shipped recipes found by name."""

from __future__ import annotations

import logging
import warnings

import pytest
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_mim import cli
from lightning_mim.console import mute_known_library_noise
from lightning_mim.recipes import RecipeNotFound, find_recipe, resolve_config_arguments, shipped_recipes


def test_help_lists_every_command_with_one_line(capsys, monkeypatch):
    # A command registered later (e.g. the study) appears without touching the help code.
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "late-command", "lightning_mim.segmentation.export_cli:main")
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m lightning_mim <command>")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    for name in ["fit", "validate", "test", "predict", *cli.EXTRA_COMMANDS]:
        assert name in rows, f"{name} missing from --help"
        assert len(rows[name]) > 10 and "``" not in rows[name], f"{name}: {rows[name]!r}"
    assert rows["late-command"] == rows["export-encoder"] == "Write the encoder of a pre-training checkpoint to a file."
    assert "mae" in text and "smit" in text  # the shipped recipes by name


def test_no_command_prints_the_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "project commands:" in capsys.readouterr().out


def test_stage_usage_names_the_program_as_typed(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["fit", "--help"])
    assert stopped.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: python -m lightning_mim [options] fit"), usage
    assert "__main__" not in usage


def test_known_library_warnings_are_muted_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mute_known_library_noise()
        warnings.warn("The `srun` command is available on your system but is not used. HINT: ...", PossibleUserWarning)
        warnings.warn("The number of training batches (2) is smaller than the logging interval Trainer("
                      "log_every_n_steps=50). Set a lower value", PossibleUserWarning)
        warnings.warn("LightningCLI's args parameter is intended to run from within Python like ...", UserWarning)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("Found 104 module(s) in eval mode at the start of training. This may ...", PossibleUserWarning)
        warnings.warn("The dataloader does not have many workers", PossibleUserWarning)
    assert [str(w.message) for w in caught] == ["The dataloader does not have many workers"]


def test_lightning_tips_are_dropped_and_information_kept(caplog):
    mute_known_library_noise()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_wandb_logger_does_not_pass_the_deprecated_anonymous_setting(tmp_path):
    from lightning_mim.loggers import MIMWandbLogger

    logger = MIMWandbLogger(save_dir=str(tmp_path))
    assert "anonymous" not in logger._wandb_init
    assert logger._wandb_init["project"] == "lightning-mim"  # the rest of the init arguments are kept


# --------------------------------------------------------------------------------------------- recipes
def test_recipe_names_resolve_in_a_checkout(monkeypatch):
    """From the repository root an uninstalled checkout finds recipes by the documented names."""
    assert {"mae.yaml", "smit.yaml", "trainer/gpu.yaml", "study/demo.yaml"} <= set(shipped_recipes())
    for name in ("mae", "mae.yaml", "experiments/mae.yaml", "trainer/cpu"):
        found = find_recipe(name)
        assert found.is_file() and found.suffix == ".yaml", name
    assert find_recipe("trainer/cpu").name == "cpu.yaml"


def test_existing_files_win_over_shipped_names(tmp_path, monkeypatch):
    own = tmp_path / "mae.yaml"
    own.write_text("model: {}\n")
    monkeypatch.chdir(tmp_path)
    assert find_recipe("mae.yaml") == own.relative_to(tmp_path)


def test_config_arguments_are_rewritten_only_when_needed(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("{}\n")
    words = ["fit", "--config", "mae", "-c", str(own), "--config=trainer/cpu", "--model.lr", "mae",
             "--config", "{trainer: {max_steps: 1}}"]
    resolved = resolve_config_arguments(words)
    assert resolved[2] == str(find_recipe("mae")) and resolved[4] == str(own)
    assert resolved[5] == "--config=" + str(find_recipe("trainer/cpu"))
    assert resolved[6:] == words[6:]  # other values, and inline YAML, are left alone


def test_unknown_config_is_one_clear_error(capsys):
    with pytest.raises(RecipeNotFound, match="no shipped recipe of that name.*mae.yaml"):
        find_recipe("no_such_recipe.yaml")
    assert cli.main(["fit", "--config", "no_such_recipe.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--config no_such_recipe.yaml" in err
