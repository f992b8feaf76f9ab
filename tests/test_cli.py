"""The real LightningCLI end to end on the embedded phantoms with a tiny MAE-3D."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mim.cli import main

REPO = Path(__file__).resolve().parents[1]
MAE = [str(REPO / "experiments/mae.yaml"), str(REPO / "tests/configs/mae_tiny.yaml")]


def configs(*files: str) -> list[str]:
    return [arg for f in files for arg in ("--config", f)]


def run_dir_args(tmp_path: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]


def cli_output(capsys, *args: str) -> str:
    """Standard output of a CLI call that prints and exits (``--print_config``, ``--help``)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.timeout(300)
def test_fit_writes_checkpoint_wandb_run_config_and_panels(tmp_path):
    import psutil
    from test_slurm import wandb_records

    main(["fit", *configs(*MAE), *run_dir_args(tmp_path)])
    # main() returns once the W&B service has exited, so the run's log is complete (it ends with the exit
    # record): a caller reading it right away never sees a cut-short run
    services = [p.name() for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]
    assert not services, f"the W&B service is still running after main() returned: {services}"
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    run = tmp_path / "lightning-mim" / run_id
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] > 0
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb")), "no W&B offline run folder"
    assert [r.WhichOneof("record_type") for r in wandb_records(offline[0])][-1] == "exit"
    saved = yaml.safe_load((run / "lightning_config.yaml").read_text())
    assert saved["model"]["class_path"] == "lightning_mim.methods.mae.MAE3D"
    assert saved["model"]["init_args"]["embed_dim"] == 48
    assert list((run / "panels").glob("step_*.png")), "no tri-planar panel written"

    # validate / test / predict from the checkpoint through the same CLI
    for stage in ("validate", "test", "predict"):
        main([stage, *configs(*MAE), *run_dir_args(tmp_path / stage), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
              "--trainer.logger", "false", "--trainer.callbacks", "[]"])


def test_loss_is_finite_and_logged(tmp_path):
    from lightning_mim.cli import MIMCLI

    cli = MIMCLI(args=["fit", *configs(*MAE), *run_dir_args(tmp_path), "--trainer.logger", "false",
                       "--trainer.max_epochs", "1"])
    logged = cli.trainer.callback_metrics
    assert {"train/loss_epoch", "val/loss"} <= set(logged)
    assert all(math.isfinite(float(logged[k])) for k in ("train/loss_epoch", "val/loss"))


def test_configs_compose_left_to_right_and_dotted_overrides_apply(capsys):
    cfg = yaml.safe_load(cli_output(capsys, "fit", *configs(*MAE), "--model.mask_ratio", "0.6", "--model.lr=3e-4",
                                    "--print_config"))
    assert cfg["model"]["init_args"]["mask_ratio"] == 0.6
    assert cfg["model"]["init_args"]["lr"] == 3e-4
    assert cfg["model"]["init_args"]["embed_dim"] == 48  # from the second file
    assert cfg["model"]["init_args"]["decoder_dim"] == 24
    assert cfg["data"]["class_path"] == "data_modules.PretrainDataModule"  # kept from the first file
    assert cfg["trainer"]["use_distributed_sampler"] is False


def test_help_is_typed(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = cli_output(capsys, "fit", "--model.help", "lightning_mim.methods.mae.MAE3D")
    assert "--model.mask_ratio MASK_RATIO" in out
    assert "(type: float, default: 0.75)" in " ".join(out.split())


def test_bad_override_fails_before_training(tmp_path):
    with pytest.raises(SystemExit):
        main(["fit", *configs(*MAE), *run_dir_args(tmp_path), "--model.mask_ratio", "not-a-number"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_model_and_data_sizes_must_agree(tmp_path, capsys):
    assert main(["fit", *configs(*MAE), *run_dir_args(tmp_path), "--model.img_size", "48", "--trainer.logger", "false"]) == 2
    assert "lightning_mim: error: model.img_size 48 differs from data.patch_size 32" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
