"""GPU code paths exercised on CPU for correctness (never for speed): bf16 autocast, SDPA attention,
``torch.compile`` (the ``compile_networks`` flag), channels-last 3D for the convolutional methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_mim.backbones.swin import MaskedSwinEncoder
from lightning_mim.backbones.vit import ViT3D
from lightning_mim.heads.mae_decoder import MAEDecoder
from lightning_mim.methods.anatomask import AnatoMask
from lightning_mim.methods.hybridmim import HybridMIM
from lightning_mim.methods.mae import MAE3D
from lightning_mim.methods.selfmedhpm import SelfMedHPM
from lightning_mim.methods.simmim import SimMIM3D
from lightning_mim.methods.smit import SMIT

_VIT = dict(embed_dim=48, depth=2, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_heads=2)
_SWIN = dict(feature_size=12, depths=[1, 1, 1, 1], window_size=4)
#: name → (class, tiny constructor arguments, input size, two views per item)
TINY = {
    "mae": (MAE3D, dict(img_size=32, **_VIT), 32, False),
    "simmim": (SimMIM3D, dict(img_size=32, **_SWIN), 32, False),
    "smit": (SMIT, dict(img_size=32, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, **_SWIN), 32, True),
    "selfmedhpm": (SelfMedHPM, dict(img_size=32, predictor_dim=24, predictor_depth=1, predictor_heads=2, **_VIT), 32,
                   False),
    "anatomask": (AnatoMask, dict(img_size=32, encoder_dims=[8, 16, 32, 64, 128], decoder_width=64), 32, False),
    "hybridmim_swin": (HybridMIM, dict(backbone="swin", img_size=(64, 32, 32), **_SWIN), (64, 32, 32), False),
    "hybridmim_unet": (HybridMIM, dict(backbone="unet", img_size=(64, 32, 32), unet_channels=[8, 8, 16, 16, 32]),
                       (64, 32, 32), False),
}


def tiny_method(name: str, **overrides):
    cls, kwargs, size, views = TINY[name]
    torch.manual_seed(0)
    module = cls(**{**kwargs, **overrides}).train()
    images = torch.rand(2, 2 if views else 1, 1, *((size,) * 3 if isinstance(size, int) else size))
    batch = {"image": images[:, 0], "case_id": ["a", "b"]}
    if views:
        batch["views"] = images
    return module, batch


def bf16_params():
    """HybridMIM-Swin's step under bf16 takes ~15 s on 2 CPU cores (CPU bf16 convolutions are slow): -m slow.
    By default its parts run under bf16 elsewhere: the Swin encoder here (SimMIM, SMIT), Swin UNETR's
    convolutional encoder blocks in tests/test_voco.py, HybridMIM's losses with the UNet here; only the
    Swin UNETR decoder under bf16 is left to -m slow."""
    for name in sorted(TINY):
        yield pytest.param(name, marks=(pytest.mark.slow,) if name == "hybridmim_swin" else (), id=name)


@pytest.mark.parametrize("name", list(bf16_params()))
def test_step_under_bf16_autocast_gives_a_finite_float32_loss_and_gradients(name):
    """oneDNN is off: its CPU bf16 conv3d weight gradient is intermittently non-finite (AnatoMask's deepest
    STU-Net conv: 3 of 25 identical steps, torch 2.14.1 on the AMD EPYC; 0 of 25 with oneDNN off), a CPU
    library fault outside this path, which runs on cuDNN on GPUs."""
    module, batch = tiny_method(name)
    with torch.backends.mkldnn.flags(enabled=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = module.shared_step(batch).losses
        assert losses["loss"].dtype == torch.float32
        assert torch.isfinite(losses["loss"])
        losses["loss"].backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def _count_sdpa(monkeypatch) -> list[int]:
    calls = [0]
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_vit_encoder_and_mae_decoder_attend_through_sdpa(monkeypatch):
    vit = ViT3D(32, 16, 1, 48, 2, 2)
    decoder = MAEDecoder(48, vit.grid, 16**3, 24, 1, 2)
    blocks = [*vit.blocks, *decoder.blocks]
    assert all(block.attn.fused_attn for block in blocks)
    calls = _count_sdpa(monkeypatch)
    decoder(vit(torch.rand(2, 1, 32, 32, 32)), None, vit.num_prefix_tokens).sum().backward()
    assert calls[0] == len(blocks)


def test_swin_uses_sdpa_for_gradient_free_passes(monkeypatch):
    """MONAI's window attention takes the SDPA path only without autograd: EMA teachers and inference."""
    encoder = MaskedSwinEncoder(32, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
    x = torch.rand(1, 1, 32, 32, 32)
    calls = _count_sdpa(monkeypatch)
    with torch.no_grad():
        reference = encoder(x)[-1]
    assert calls[0] == 4  # one block per stage
    calls[0] = 0
    assert torch.allclose(encoder(x)[-1], reference, atol=1e-5)  # the autograd path agrees with it
    assert calls[0] == 0


@pytest.mark.parametrize("name", ["anatomask", "hybridmim_unet"])
def test_channels_last_3d_gives_the_same_loss(name):
    overrides = {"unet_dropout": 0.0} if name == "hybridmim_unet" else {}
    module, batch = tiny_method(name, **overrides)
    torch.manual_seed(1)
    reference = module.shared_step(batch).losses["loss"]
    module = module.to(memory_format=torch.channels_last_3d)
    batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last_3d)}
    torch.manual_seed(1)
    loss = module.shared_step(batch).losses["loss"]
    assert torch.allclose(loss, reference, rtol=1e-4, atol=1e-5)


def test_compile_networks_flag_compiles_children_in_place_and_keeps_the_state_dict():
    module, _ = tiny_method("selfmedhpm", compile_networks=True)
    keys = list(module.state_dict())
    module.configure_model()
    module.configure_model()  # Lightning may call it again (fit, then test): compiles once
    assert module.encoder._compiled_call_impl is not None
    assert module.teacher._compiled_call_impl is not None
    assert list(module.state_dict()) == keys
    plain, _ = tiny_method("selfmedhpm")
    plain.configure_model()
    assert plain.encoder._compiled_call_impl is None


@pytest.mark.slow
def test_compiled_encoder_matches_eager():
    torch.manual_seed(0)
    vit = ViT3D(32, 16, 1, 48, 2, 2).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    eager = vit(x)
    compiled = torch.compile(vit)(x)
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
