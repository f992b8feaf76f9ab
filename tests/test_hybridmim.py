"""HybridMIM (methods/hybridmim.py): construction checks, step, export, and real CLI runs."""

import math

import lightning as L
import pytest
import torch
import wandb
from monai.networks.nets import SwinUNETR

import data_modules  # noqa: F401  (imported before the CLI changes directory to the config's folder)
from lightning_mim.backbones.unet import UNet3D
from lightning_mim.cli import main
from lightning_mim.methods.hybridmim import HybridMIM

TINY_SWIN = dict(backbone="swin", img_size=64, feature_size=12, depths=(1, 1, 1, 1))
TINY_UNET = dict(backbone="unet", img_size=64, unet_channels=(4, 4, 8, 8, 16))


def ct_like(batch=2, side=64):
    torch.manual_seed(0)
    return torch.rand(batch, 1, side, side, side) * 0.999 + 0.001


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size=72), "divisible by the cell size"),
    (dict(img_size=68), "total stride"),
    (dict(img_size=48), "regions"),
    (dict(mask_ratio=1.0), "ratio"),
    (dict(mask_ratio_range=(0.5, 0.2)), "mask_ratio_range"),
    (dict(partial_box_size=20), "multiple"),
    (dict(img_size=32, unet_channels=(4, 4, 8, 8, 16, 16), unet_strides=(2, 2, 2, 2, 2)), "one bottleneck cell"),
    (dict(contrastive_token=512), "contrastive_token"),
    (dict(fill="mean"), "fill"),
    (dict(backbone="vit"), "backbone"),
])
def test_bad_configurations_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridMIM(**{**TINY_UNET, **kwargs})


def test_fixed_box_and_region_pooling_follow_the_published_layout():
    unet = HybridMIM(backbone="unet", img_size=96, unet_channels=(4, 4, 8, 8, 16))
    assert unet.bottleneck_grid == (12, 12, 12) and unet.region_pool == 4
    assert unet.choose_box().voxel_slices((8, 8, 8))[0] == slice(32, 96)
    swin = HybridMIM(**{**TINY_SWIN, "img_size": 96})
    assert swin.bottleneck_grid == (3, 3, 3) and swin.region_pool == 1
    assert swin.choose_box().voxel_slices((32, 32, 32))[0] == slice(32, 96)
    moving = HybridMIM(backbone="unet", img_size=96, unet_channels=(4, 4, 8, 8, 16), partial_box="random")
    boxes = {moving.choose_box() for _ in range(20)}
    assert len(boxes) > 1 and all(b.size == (8, 8, 8) and max(b.start) <= 4 for b in boxes)


def test_mask_ratio_range_sampling():
    clamped = HybridMIM(**TINY_UNET, mask_ratio_range=(0.4, 0.75))
    draws = torch.tensor([clamped.draw_mask_ratio() for _ in range(400)])
    assert draws.min() >= 0.4 and draws.max() <= 0.75
    assert ((draws == 0.4) | (draws == 0.75)).float().mean() > 0.5  # clamp(U[0,1)) piles up at both ends
    uniform = HybridMIM(**TINY_UNET, mask_ratio_range=(0.4, 0.75), mask_ratio_sampling="uniform")
    draws = torch.tensor([uniform.draw_mask_ratio() for _ in range(200)])
    assert ((draws > 0.4) & (draws < 0.75)).all()
    assert HybridMIM(**TINY_UNET).draw_mask_ratio() == 0.4


def test_unet_step_logs_every_term_and_trains_all_heads():
    model = HybridMIM(**TINY_UNET)
    out = model.shared_step({"image": ct_like()})
    assert set(out.losses) == {"loss", "partial_region", "count", "location", "consistency", "contrastive"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    weights = dict(partial_region=1.0, count=0.1, location=0.1, consistency=0.01, contrastive=0.1)
    expected = sum(w * out.losses[name] for name, w in weights.items())
    assert out.losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= float(out.scalars["count_accuracy"]) <= 1.0
    # 64³ / 16³ → 64 patches, keep floor(64·0.6) = 38, mask 26.
    assert float(out.scalars["mask_ratio"]) == pytest.approx(26 / 64)
    out.losses["loss"].backward()
    for head in (model.count_head, model.location_head, model.projection, model.decoder, model.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_dropout_is_the_only_difference_between_the_two_encoder_passes():
    for kwargs in (TINY_UNET, TINY_SWIN):
        model = HybridMIM(**kwargs)
        images = ct_like(1)
        with torch.no_grad():
            assert not torch.allclose(model.encode(images)[-1], model.encode(images)[-1])
            model.eval()
            assert torch.equal(model.encode(images)[-1], model.encode(images)[-1])


def contrastive_encoder_gradient(state: dict, grad_both: bool) -> list[torch.Tensor]:
    model = HybridMIM(**TINY_UNET, contrastive_grad_both=grad_both, weight_partial_region=0.0, weight_count=0.0,
                      weight_location=0.0, weight_consistency=0.0)
    model.load_state_dict(state)
    model.eval()  # no dropout: both passes give the same embedding
    torch.manual_seed(3)
    model.shared_step({"image": ct_like()}).losses["loss"].backward()
    return [p.grad.clone() for p in model.encoder.parameters() if p.grad is not None]


def test_second_pass_is_gradient_free_unless_asked():
    state = HybridMIM(**TINY_UNET).state_dict()
    one, both = contrastive_encoder_gradient(state, False), contrastive_encoder_gradient(state, True)
    # NT-Xent is symmetric in its two arguments, so at identical embeddings the second branch adds
    # exactly the first branch's gradient: twice as much when it is not detached.
    assert len(one) == len(both) > 0
    for g1, g2 in zip(one, both):
        assert torch.allclose(g2, 2 * g1, rtol=1e-4, atol=1e-8)


def test_swin_export_loads_strictly_into_monai_swin_unetr_and_matches_it():
    torch.manual_seed(0)
    model = HybridMIM(**TINY_SWIN).eval()
    export = model.export_encoder()
    assert export.target == "swin_unetr"
    assert any(k.startswith("swinViT.layers4") for k in export.state_dict)
    assert any(k.startswith("decoder1.") for k in export.state_dict)
    network = SwinUNETR(out_channels=5, **export.network_kwargs).eval()
    result = network.load_state_dict(export.state_dict, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    # With the pre-training out layer copied in, MONAI's full-volume forward equals our encoder + decoder.
    check = SwinUNETR(out_channels=1, **export.network_kwargs).eval()
    check.load_state_dict({**export.state_dict, **{f"out.{k}": v for k, v in model.decoder.out.state_dict().items()}})
    images = ct_like(1)
    with torch.no_grad():
        ours = model.decode(images, model.encode(images), None)
        assert torch.allclose(check(images), ours, atol=1e-5)


def test_unet_export_is_the_full_network_without_its_output_layer():
    torch.manual_seed(0)
    model = HybridMIM(**TINY_UNET).eval()
    export = model.export_encoder()
    assert export.target == "hybridmim_unet"
    network = UNet3D(out_channels=3, **export.network_kwargs).eval()
    result = network.load_state_dict(export.state_dict, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["decoder.out.conv.conv.bias", "decoder.out.conv.conv.weight"]
    assert network(ct_like(1)).shape == (1, 3, 64, 64, 64)
    # With the pre-training out layer copied in, the full-volume network equals our encoder + decoder.
    check = UNet3D(out_channels=1, **export.network_kwargs).eval()
    check.load_state_dict({**export.state_dict, **{f"decoder.out.{k}": v for k, v in model.decoder.out.state_dict().items()}})
    images = ct_like(1)
    with torch.no_grad():
        assert torch.allclose(check(images), model.decode(images, model.encode(images), None), atol=1e-6)


# ---------------------------------------------------------------------------------------- CLI runs
RECORDED: dict[str, dict[str, float]] = {}


class MetricsRecorder(L.Callback):
    """Keeps the metrics logged by the run (the CLI runs in-process)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_train_end(self, trainer, pl_module) -> None:
        RECORDED[self.key] = {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return tmp_path_factory.mktemp("hybridmim_data")


@pytest.mark.parametrize("variant", ["unet", "swin"])
def test_cli_runs_real_training_steps(variant, tmp_path, phantoms):
    main([
        "fit",
        "--config", f"experiments/hybridmim_{variant}.yaml",
        "--config", f"tests/configs/hybridmim_{variant}_tiny.yaml",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.phantom_root", str(phantoms / "phantoms"),
        "--data.init_args.cache_dir", str(phantoms / "cache"),
        "--trainer.callbacks+=test_hybridmim.MetricsRecorder",
        f"--trainer.callbacks.key={variant}",
    ])
    if wandb.run is not None:  # the next in-process run must start its own W&B run
        wandb.finish()
    assert list(tmp_path.rglob("checkpoints/last.ckpt"))
    metrics = RECORDED[variant]
    for term in ("loss", "partial_region", "count", "location", "consistency", "contrastive", "count_accuracy"):
        assert math.isfinite(metrics[f"train/{term}"]), term
        assert math.isfinite(metrics[f"val/{term}"]), term


def test_warmup_steps_override_warmup_epochs():
    from types import SimpleNamespace

    model = HybridMIM(**TINY_UNET, lr=1e-4, warmup_steps=500, warmup_epochs=3)
    model.trainer = SimpleNamespace(max_steps=100_000, max_epochs=-1, num_training_batches=11, accumulate_grad_batches=1)
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    factors = [scheduler.lr_lambdas[0](step) for step in (0, 250, 500, 50_250, 100_000)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
