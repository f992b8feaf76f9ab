"""SimMIM-3D: masking counts, loss confined to masked voxels, no leakage through masked cells, export, CLI."""

import math
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

import data_modules  # noqa: F401  (import the package before the CLI changes directory to the config's)
import lightning_mim.methods.simmim as simmim_module
from lightning_mim import cli
from lightning_mim.losses.reconstruction import masked_voxel_l1
from lightning_mim.masking.grid import voxel_mask
from lightning_mim.masking.random import random_cell_mask
from lightning_mim.methods.simmim import SimMIM3D

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, feature_size=12, depths=[1, 1, 1, 1])


def test_step_masks_ceil_of_ratio_and_logs_finite_loss():
    model = SimMIM3D(**TINY, mask_ratio=0.6)
    assert model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)}).visuals == {}  # built only when captured
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert torch.isfinite(out.losses["loss"]) and set(out.losses) == {"loss", "mip"}
    assert out.scalars["mask_ratio"].item() == pytest.approx(math.ceil(0.6 * 8) / 8)
    assert list(out.visuals) == ["input", "masked", "reconstruction"]
    out.losses["loss"].backward()
    assert model.encoder.mask_token.grad is not None and model.decoder.proj.weight.grad is not None


def test_loss_ignores_predictions_at_visible_voxels(monkeypatch):
    model = SimMIM3D(**TINY)
    images = torch.rand(2, 1, 32, 32, 32)
    cells = random_cell_mask(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(simmim_module, "random_cell_mask", lambda *a, **k: cells)
    outputs = []
    decoder_forward = model.decoder.forward
    model.decoder.forward = lambda f: outputs.append(decoder_forward(f)) or outputs[-1]
    loss = model.shared_step({"image": images}).losses["loss"]
    pred, voxels = outputs[0].detach(), voxel_mask(cells, 16)
    torch.testing.assert_close(loss.detach(), masked_voxel_l1(pred, images, voxels))
    visible_changed = torch.where(voxels.bool(), pred, pred + 10.0 * torch.randn_like(pred))
    torch.testing.assert_close(masked_voxel_l1(visible_changed, images, voxels), loss.detach())
    off_by_one_where_masked = torch.where(voxels.bool(), images + 1.0, pred)
    assert masked_voxel_l1(off_by_one_where_masked, images, voxels).item() == pytest.approx(1.0, rel=1e-4)


def test_masked_cells_do_not_leak_into_the_prediction():
    model = SimMIM3D(**TINY, encoder="swin_smit").eval()
    cells = random_cell_mask(1, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(3))
    voxels = voxel_mask(cells, 16).bool()
    images = torch.rand(1, 1, 32, 32, 32)
    other = torch.where(voxels, torch.rand_like(images), images)
    with torch.no_grad():
        torch.testing.assert_close(model.reconstruct(images, cells), model.reconstruct(other, cells))
        assert not torch.allclose(model.reconstruct(images, ~cells), model.reconstruct(other, ~cells))


def test_bad_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="mask ratio"):
        SimMIM3D(**TINY, mask_ratio=0.0)
    with pytest.raises(ValueError, match="multiple of the token patch"):
        SimMIM3D(**TINY, mask_cell=5)
    with pytest.raises(ValueError, match="divisible by patch size"):
        SimMIM3D(**{**TINY, "img_size": 40})


@pytest.mark.parametrize("encoder", ["swin_unetr", "swin_smit"])
def test_export_is_a_plain_swinunetr_load(encoder):
    model = SimMIM3D(**TINY, encoder=encoder).eval()
    export = model.export_encoder()
    assert export.target == "swin_unetr" and all(k.startswith("swinViT.") for k in export.state_dict)
    assert not any("mask_token" in k for k in export.state_dict)
    net = SwinUNETR(out_channels=2, **export.network_kwargs).eval()
    missing, unexpected = net.load_state_dict(export.state_dict, strict=False)
    assert not unexpected and not any(k.startswith("swinViT.") for k in missing)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.swinViT(x, True)[-1], model.encoder(x)[-1], atol=1e-5, rtol=1e-4)


def test_cli_end_to_end(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(cli.MIMCLI, "after_fit", lambda self: runs.append(self.trainer), raising=False)
    monkeypatch.chdir(ROOT)
    cli.main([
        "fit", "--config", "experiments/simmim.yaml", "--config", "tests/configs/simmim_tiny.yaml",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(tmp_path / "phantoms"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ])
    (trainer,) = runs
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics
    for name in ("train/loss_step", "train/mip_step", "train/mask_ratio", "val/loss"):
        assert name in metrics and torch.isfinite(metrics[name]), name
    assert list(tmp_path.rglob("last.ckpt"))
    assert list(tmp_path.rglob("panels/step_*.png"))
