import pytest
import torch

from lightning_mim.backbones.vit import ViT3D, sincos_position_embedding_3d
from lightning_mim.masking.random import random_mask, visible_indices
from lightning_mim.methods.mae import MAE3D


def test_position_embeddings_are_distinct_per_token():
    table = sincos_position_embedding_3d((3, 4, 5), 48)
    assert table.shape == (60, 48)
    distances = torch.cdist(table, table) + torch.eye(60) * 1e3
    assert distances.min() > 1e-3


def test_position_width_must_be_divisible_by_six():
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_embedding_3d((2, 2, 2), 32)


def test_encoder_sees_visible_tokens_only():
    torch.manual_seed(0)
    vit = ViT3D(32, 16, 1, 48, 2, 2).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    mask = random_mask(2, 8, 6)
    vis = visible_indices(mask)
    out = vit(x, vis)
    assert out.shape == (2, 1 + 2, 48)
    # changing a masked patch's voxels does not change the encoding
    x2 = x.clone()
    masked_token = mask[0].nonzero()[0].item()
    g = (masked_token // 4, (masked_token // 2) % 2, masked_token % 2)
    x2[0, :, g[0] * 16:(g[0] + 1) * 16, g[1] * 16:(g[1] + 1) * 16, g[2] * 16:(g[2] + 1) * 16] += 10
    assert torch.allclose(vit(x2, vis), out, atol=1e-5)


def test_vit_rejects_wrong_input_size():
    with pytest.raises(ValueError, match="built for inputs"):
        ViT3D(32, 16, 1, 48, 1, 2)(torch.zeros(1, 1, 48, 48, 48))


def tiny_mae(**kw):
    args = dict(img_size=32, embed_dim=48, depth=2, num_heads=2, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    args.update(kw)
    return MAE3D(**args)


def test_mae_step_logs_finite_loss_and_visuals():
    model = tiny_mae()
    model.capture_visuals = True
    out = model.shared_step({"image": torch.rand(2, 1, 32, 32, 32)})
    assert torch.isfinite(out.losses["loss"])
    assert set(out.visuals) == {"input", "masked", "reconstruction"}
    masked_fraction = (out.visuals["masked"] == 0).float().mean().item()
    assert abs(masked_fraction - 6 / 8) < 0.05  # 8 tokens, floor(8·0.25)=2 kept → 6 masked


def test_mae_overfits_a_single_volume():
    torch.manual_seed(0)
    model = tiny_mae(mask_ratio=0.5)
    x = torch.rand(1, 1, 32, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        loss = model.shared_step({"image": x}).losses["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_visuals_are_built_only_when_the_panel_callback_asks():
    model = tiny_mae()
    assert model.shared_step({"image": torch.rand(1, 1, 32, 32, 32)}).visuals == {}
    model.capture_visuals = True
    assert set(model.shared_step({"image": torch.rand(1, 1, 32, 32, 32)}).visuals) == {"input", "masked", "reconstruction"}


def test_patch_embedding_equals_its_strided_convolution_and_embeds_only_visible_patches():
    torch.manual_seed(0)
    vit = ViT3D((32, 48, 16), 16, 2, 48, 1, 2)
    x = torch.randn(2, 2, 32, 48, 16)
    reference = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # the Conv3d the weights belong to
    assert torch.allclose(vit.patch_embed(x), reference, atol=1e-5)
    visible = visible_indices(random_mask(2, 6, 4))
    expected = torch.gather(reference, 1, visible.unsqueeze(-1).expand(-1, -1, 48))
    assert torch.allclose(vit.patch_embed(x, visible), expected, atol=1e-5)


def test_the_training_step_predicts_only_masked_tokens_with_the_same_loss_and_gradients():
    model = tiny_mae()
    images = torch.rand(2, 1, 32, 32, 32)
    results = []
    for full in (True, False):  # with panels every token is predicted; without, only the masked ones
        model.zero_grad()
        model.capture_visuals = full
        torch.manual_seed(3)  # the same mask both times
        loss = model.shared_step({"image": images}).losses["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full_loss, full_grads), (loss, grads) = results
    torch.testing.assert_close(loss, full_loss)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
