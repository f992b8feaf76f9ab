"""Models Genesis: corruptions on hand-computed cases, loss wiring, [0, 1] check, export, bf16, CLI fit."""

import pytest
import torch

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.corruption.genesis import (
    GenesisConfig,
    bezier_curve,
    bezier_intensity,
    genesis_corrupt,
    in_painting,
    local_shuffle,
    out_painting,
    shuffle_block_count,
)
from lightning_mim.methods.models_genesis import ModelsGenesis
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(img_size=(32, 32, 16), unet_channels=[4, 8, 8, 16], shuffle_blocks=200)


def test_bezier_curve_value_by_hand():
    control = torch.tensor([[0.0, 0.0], [0.2, 0.6], [0.4, 0.9], [1.0, 1.0]], dtype=torch.float64)
    # B(½) = ⅛P0 + ⅜P1 + ⅜P2 + ⅛P3 = (0.35, 0.6875)
    torch.testing.assert_close(bezier_curve(control, torch.tensor([0.5])), torch.tensor([[0.35, 0.6875]],
                                                                                       dtype=torch.float64))


def test_bezier_intensity_maps_curve_points_and_inverts():
    image = torch.tensor([0.35, 0.0, 1.0, 1.5, -0.2])
    up = bezier_intensity(image, (0.2, 0.6), (0.4, 0.9), invert=False)
    torch.testing.assert_close(up, torch.tensor([0.6875, 0.0, 1.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    down = bezier_intensity(torch.linspace(0, 1, 11), (0.2, 0.6), (0.4, 0.9), invert=True)
    assert down[0] == pytest.approx(1.0) and down[-1] == pytest.approx(0.0) and torch.all(down.diff() <= 1e-6)
    # the identity curve (control points on the diagonal) leaves intensities unchanged
    x = torch.rand(100)
    torch.testing.assert_close(bezier_intensity(x, (1 / 3, 1 / 3), (2 / 3, 2 / 3), False), x, atol=1e-4, rtol=0)


def test_local_shuffle_permutes_within_small_blocks_only():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(2 * 30 * 30 * 20, dtype=torch.float32).view(2, 30, 30, 20)
    single = local_shuffle(image, 1, g)
    assert torch.equal(single.flatten().sort().values, image.flatten().sort().values)  # one block: a permutation
    out = local_shuffle(image, 300, g)  # overlapping blocks read the original, the last one wins (official)
    assert torch.isin(out, image).all() and (out != image).any()
    torch.testing.assert_close(out[1] - out[0], image[1] - image[0])  # channels move together
    moved = (out[0] != image[0]).nonzero()
    source = out[0][tuple(moved.T)].long()
    src = torch.stack([source // 600, source // 20 % 30, source % 20], 1)
    assert ((src - moved).abs() <= torch.tensor([2, 2, 1])).all()  # blocks ≤ ⌊S/10⌋ per axis


def test_painting_fills_with_unit_noise():
    g = torch.Generator().manual_seed(1)
    image = torch.full((1, 36, 36, 18), 5.0)
    inside = in_painting(image, g)
    changed = inside != 5.0
    assert changed.any() and inside[changed].min() >= 0 and inside[changed].max() < 1
    outside = out_painting(image, g)
    kept = outside == 5.0
    assert 0 < kept.float().mean() < 1 and outside[~kept].max() < 1


def test_corrupt_targets_share_the_flips_and_identity_without_transforms():
    images = torch.rand(3, 1, 16, 16, 8)
    none = GenesisConfig(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)
    x, y, record = genesis_corrupt(images, none, torch.Generator().manual_seed(0))
    assert torch.equal(x, images) and torch.equal(y, images) and not any(any(r.values()) for r in record)
    flips = GenesisConfig(flip_rate=1.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)
    x, y, _ = genesis_corrupt(images, flips, torch.Generator().manual_seed(0))
    assert torch.equal(x, y) and not torch.equal(y, images)
    assert shuffle_block_count((64, 64, 32), 10_000) == 10_000 and shuffle_block_count((32, 32, 16), 10_000) == 1250


def test_loss_is_mse_of_the_sigmoid_restoration_and_gradients_flow():
    torch.manual_seed(0)
    model = ModelsGenesis(**TINY)
    images = torch.rand(2, 1, 32, 32, 16)
    model.capture_visuals = True
    out = model.shared_step({"image": images})
    x, y, _ = genesis_corrupt(images, model.corruption, model.step_generator(model.hparams.seed))
    torch.testing.assert_close(out.losses["loss"], torch.nn.functional.mse_loss(model.restore(x), y))
    assert list(out.visuals) == ["target", "corrupted", "restored", "heat/error"]
    out.losses["loss"].backward()
    assert model.network.encoder.stem.conv_0.conv.weight.grad.abs().sum() > 0


def test_out_of_range_data_fail_with_the_fix_named_and_percentile_mapping_accepts_them():
    images = torch.randn(2, 1, 32, 32, 16) * 3
    with pytest.raises(ValueError, match="intensity_mapping percentile"):
        ModelsGenesis(**TINY).shared_step({"image": images})
    out = ModelsGenesis(**TINY, intensity_mapping="percentile").shared_step({"image": images})
    assert torch.isfinite(out.losses["loss"])


def test_export_is_the_whole_unet_without_its_output_layer():
    model = ModelsGenesis(**TINY)
    export = model.export_encoder()
    net = UNet3D(out_channels=4, **export.network_kwargs)
    result = net.load_state_dict(export.state_dict, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]


def test_bf16_autocast_step():
    bf16_step(ModelsGenesis(**TINY), {"image": torch.rand(2, 1, 32, 32, 16)})


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "models_genesis.yaml", "models_genesis_tiny.yaml")
    assert_fit_outputs(trainer, tmp_path, ["loss", "restoration_mse"], steps=2)
