"""Volume Fusion: label generators, a fused map by hand, loss wiring, export, bf16, CLI fit."""

import pytest
import torch
from monai.losses import DiceCELoss

import data_modules  # noqa: F401  (import before the CLI changes directory)
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.corruption.fusion import fuse, grid_block_labels, random_box_labels
from lightning_mim.methods.volume_fusion import VolumeFusion
from tests.new_methods import assert_fit_outputs, bf16_step, cli_fit

TINY = dict(img_size=(32, 32, 16), unet_channels=[4, 8, 8, 16], unet_strides=[2, 2, 2], box_range=(2, 4))


def test_fused_label_map_by_hand():
    labels = torch.tensor([[[[0, 1], [2, 4]]]])  # 1 × 1 × 2 × 2, K = 4
    fg, bg = torch.full((1, 1, 1, 2, 2), 8.0), torch.zeros(1, 1, 1, 2, 2)
    assert fuse(fg, bg, labels, 5).flatten().tolist() == [0.0, 2.0, 4.0, 8.0]


def test_random_boxes_are_clipped_labelled_one_to_k_and_sized_as_configured():
    g = torch.Generator().manual_seed(0)
    labels = random_box_labels((3, 40, 40, 20), 5, (1, 1), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), generator=g)
    for sample in labels:  # one box of side 20 × 20 × 10, possibly clipped at the border
        values = sample.unique().tolist()
        assert len(values) == 2 and values[0] == 0 and 1 <= values[1] <= 4
        inside = (sample > 0).nonzero()
        extent = inside.max(0).values - inside.min(0).values + 1
        assert (extent <= torch.tensor([20, 20, 10])).all() and (sample > 0).sum() == extent.prod()
    many = random_box_labels((2, 32, 32, 16), 5, generator=g)
    assert set(many.unique().tolist()) <= {0, 1, 2, 3, 4} and (many > 0).float().mean() > 0.3


def test_grid_labels_tile_cells_with_the_configured_fraction():
    g = torch.Generator().manual_seed(0)
    labels = grid_block_labels((1, 16, 16, 16), 5, (4, 4, 4), (4, 4, 4), fraction=0.5, generator=g)
    cells = labels[0].view(4, 4, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(64, 64)
    assert all(len(c.unique()) == 1 for c in cells)  # constant per 4³ cell
    assert int((cells[:, 0] > 0).sum()) == 32


def test_loss_is_dice_ce_on_the_fused_volume_and_gradients_flow():
    torch.manual_seed(0)
    model = VolumeFusion(**TINY)
    images = torch.rand(3, 1, 32, 32, 16)
    model.capture_visuals = True
    out = model.shared_step({"image": images})
    fg, bg, labels = model.pair_and_labels({"image": images}, model.step_generator(model.hparams.seed))
    assert torch.equal(fg, images.roll(1, 0)) and torch.equal(bg, images)
    logits = model.network(fuse(fg, bg, labels, 5))
    expected = DiceCELoss(to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, labels.unsqueeze(1))
    torch.testing.assert_close(out.losses["loss"], expected)
    assert {"fused", "heat/alpha_label"} <= set(out.visuals)
    out.losses["loss"].backward()
    assert model.network.encoder.stem.conv_0.conv.weight.grad.abs().sum() > 0


def test_batch_of_one_and_missing_views_fail_clearly():
    with pytest.raises(ValueError, match="batch_size ≥ 2"):
        VolumeFusion(**TINY).shared_step({"image": torch.rand(1, 1, 32, 32, 16)})
    model = VolumeFusion(**TINY).eval()
    image = torch.rand(1, 1, 32, 32, 16)
    fg, _, _ = model.pair_and_labels({"image": image}, model.step_generator(model.hparams.seed))
    assert torch.equal(fg, image.flip((2, 3, 4)))
    with pytest.raises(ValueError, match="num_views: 2"):
        VolumeFusion(**TINY, mode="grid_same_volume").shared_step({"image": torch.rand(2, 1, 32, 32, 16)})


def test_grid_mode_fuses_two_views():
    views = torch.rand(2, 2, 1, 32, 32, 16)
    out = VolumeFusion(**TINY, mode="grid_same_volume").shared_step({"image": views[:, 0], "views": views})
    assert torch.isfinite(out.losses["loss"])


def test_export_is_the_whole_unet_without_its_output_layer():
    export = VolumeFusion(**TINY).export_encoder()
    net = UNet3D(out_channels=14, **export.network_kwargs)
    result = net.load_state_dict(export.state_dict, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]


def test_bf16_autocast_step():
    bf16_step(VolumeFusion(**TINY), {"image": torch.rand(2, 1, 32, 32, 16)})


@pytest.mark.timeout(300)
def test_cli_fit(tmp_path, monkeypatch):
    trainer = cli_fit(tmp_path, monkeypatch, "volume_fusion.yaml", "volume_fusion_tiny.yaml")
    assert_fit_outputs(trainer, tmp_path, ["loss", "dice_ce", "voxel_accuracy"], steps=2)


def test_fine_tuning_loader_takes_encoder_and_decoder():
    from lightning_mim.segmentation.networks import build_network
    from lightning_mim.segmentation.weights import export_module, load_pretrained

    model = VolumeFusion(**TINY)
    file = export_module(model)
    kwargs = {k: v for k, v in file.network_kwargs.items() if k != "in_channels"}
    network = build_network("hybridmim_unet", 1, 14, (32, 32, 16), **kwargs)
    report = load_pretrained(network, file, log=None)
    assert any(k.startswith("decoder.") for k in report.loaded) and not report.unexpected
    assert report.from_scratch == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]
