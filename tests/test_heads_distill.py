"""Pixel-shuffle decoder, DINO head and the centred/sharpened distillation cross-entropy."""

import math

import pytest
import torch

import lightning_mim.losses.distillation as distillation
from lightning_mim.heads.dino import DINOHead, drop_last_layer_gradients
from lightning_mim.heads.pixel_shuffle import LinearPixelShuffleDecoder, pixel_shuffle_3d, pixel_unshuffle_3d
from lightning_mim.losses.distillation import (
    DistillationCE,
    collapse_monitors,
    cross_view_distillation,
    masked_token_distillation,
)
from lightning_mim.masking.grid import patchify


# ---------------------------------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_places_channel_blocks_at_documented_voxels():
    r, c = 2, 3
    x = torch.randn(1, c * r**3, 2, 3, 4)
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (1, c, 4, 6, 8)
    for ch, d, h, w, i, j, k in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 1, 0, 1), (2, 0, 1, 2, 1, 1, 0), (2, 1, 0, 3, 1, 1, 1)]:
        assert y[0, ch, d * r + i, h * r + j, w * r + k] == x[0, ch * r**3 + (i * r + j) * r + k, d, h, w]


def test_pixel_unshuffle_inverts_shuffle_and_matches_patchify_order():
    x = torch.randn(2, 2 * 27, 2, 2, 3)
    torch.testing.assert_close(pixel_unshuffle_3d(pixel_shuffle_3d(x, 3), 3), x, rtol=0, atol=0)
    volume = torch.randn(2, 1, 8, 8, 12)
    torch.testing.assert_close(pixel_shuffle_3d(pixel_unshuffle_3d(volume, 4), 4), volume, rtol=0, atol=0)
    # one channel: the channels of a cell are that cell's patch in patchify's (p0, p1, p2) order
    cells = pixel_unshuffle_3d(volume, 4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(cells, patchify(volume, 4), rtol=0, atol=0)


def test_linear_pixel_shuffle_decoder():
    decoder = LinearPixelShuffleDecoder(in_channels=16, stride=4, out_channels=2)
    assert decoder.proj.out_channels == 4**3 * 2 and decoder.proj.kernel_size == (1, 1, 1)
    out = decoder(torch.randn(3, 16, 2, 2, 2))
    assert out.shape == (3, 2, 8, 8, 8)
    # a bottleneck cell only drives the voxels of its own 4³ block
    feats = torch.zeros(1, 16, 2, 2, 2)
    base = decoder(feats)
    feats[0, :, 1, 0, 1] = 1.0
    changed = (decoder(feats) - base).abs().sum(dim=1)[0] > 0
    expected = torch.zeros(8, 8, 8, dtype=torch.bool)
    expected[4:8, 0:4, 4:8] = True
    assert torch.equal(changed, expected)
    with pytest.raises(ValueError, match="cannot be shuffled"):
        pixel_shuffle_3d(torch.randn(1, 7, 2, 2, 2), 2)


# ---------------------------------------------------------------------------------------------- DINO head
def test_dino_head_structure_and_frozen_unit_gain():
    head = DINOHead(in_dim=10, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert head.mlp[-1].out_features == 8 and head.last_layer.bias is None
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=10.0)
    for _ in range(3):
        head(torch.randn(4, 5, 10)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.all(gain == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))
    # logits are cosine similarities: bounded by 1 whatever the input scale
    assert head(1e3 * torch.randn(6, 10)).abs().max() <= 1.0 + 1e-5


def test_dino_head_unfrozen_gain_trains():
    head = DINOHead(in_dim=10, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=2, norm_last_layer=False)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear"]
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.requires_grad
    head(torch.randn(4, 10)).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- distillation
def softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_distillation_ce_matches_hand_computation():
    criterion = DistillationCE(out_dim=3, student_temp=0.1)
    criterion.center.copy_(torch.tensor([0.5, 0.0, 0.0]))
    teacher, student = [1.0, 2.0, 3.0], [0.3, -0.2, 0.1]
    p_t = softmax([(t - c) / 0.5 for t, c in zip(teacher, [0.5, 0.0, 0.0])])
    q_s = softmax([s / 0.1 for s in student])
    expected = -sum(p * math.log(q) for p, q in zip(p_t, q_s))
    probs = criterion.teacher_probs(torch.tensor([teacher]), temperature=0.5)
    torch.testing.assert_close(probs[0], torch.tensor(p_t))
    value = criterion(torch.tensor([student]), probs)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_center_moves_toward_batch_mean_by_momentum():
    criterion = DistillationCE(out_dim=4, center_momentum=0.9)
    first = torch.randn(2, 5, 4)  # patch logits: mean over batch *and* tokens
    criterion.update_center(first)
    torch.testing.assert_close(criterion.center, 0.1 * first.mean(dim=(0, 1)))
    second = torch.randn(3, 4)
    criterion.update_center(second)
    torch.testing.assert_close(criterion.center, 0.9 * 0.1 * first.mean(dim=(0, 1)) + 0.1 * second.mean(dim=0))


def test_center_is_averaged_over_ranks(monkeypatch):
    """Under DDP the batch mean is all-reduced (summed) and divided by the world size."""
    other_rank_mean = torch.tensor([4.0, 0.0, -2.0])

    def fake_all_reduce(tensor):
        tensor += other_rank_mean

    monkeypatch.setattr(distillation.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distillation.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distillation.dist, "all_reduce", fake_all_reduce)
    criterion = DistillationCE(out_dim=3, center_momentum=0.5)
    local = torch.tensor([[2.0, 2.0, 2.0], [0.0, 2.0, 0.0]])  # local mean (1, 2, 1)
    criterion.update_center(local)
    torch.testing.assert_close(criterion.center, 0.5 * torch.tensor([2.5, 1.0, -0.5]))


def test_masked_token_distillation_averages_masked_tokens_per_sample():
    criterion = DistillationCE(out_dim=5)
    student = torch.randn(1, 2, 3, 5)
    teacher = criterion.teacher_probs(torch.randn(1, 2, 3, 5), 0.04)
    mask = torch.tensor([[[True, False, True], [False, False, False]]])
    ce = criterion(student, teacher)
    expected = ((ce[0, 0, 0] + ce[0, 0, 2]) / 2 + 0.0) / 2  # 2nd sample has no masked token → 0 (max(1, ΣM))
    assert masked_token_distillation(criterion, student, teacher, mask).item() == pytest.approx(expected.item())
    changed = student.clone()
    changed[0, 0, 1] += 5.0  # a visible token
    changed[0, 1] -= 3.0
    assert masked_token_distillation(criterion, changed, teacher, mask).item() == pytest.approx(expected.item())


def test_cross_view_distillation_uses_other_views_only():
    criterion = DistillationCE(out_dim=6)
    student = torch.randn(2, 3, 6)
    teacher = criterion.teacher_probs(torch.randn(2, 3, 6), 0.07)
    expected = (criterion(student[1], teacher[0]).mean() + criterion(student[0], teacher[1]).mean()) / 2
    torch.testing.assert_close(cross_view_distillation(criterion, student, teacher), expected)
    one_sided = cross_view_distillation(criterion, student[:1], teacher, pairs=[(1, 0)])
    torch.testing.assert_close(one_sided, criterion(student[0], teacher[1]).mean())
    with pytest.raises(ValueError, match="explicit view pairs"):
        cross_view_distillation(criterion, student[:1], teacher)


def test_collapse_monitors():
    uniform = torch.full((4, 8), 1 / 8)
    stats = collapse_monitors(uniform)
    assert stats["entropy"].item() == pytest.approx(math.log(8)) and stats["kl_uniform"].item() == pytest.approx(0, abs=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 3]), 8).float()
    stats = collapse_monitors(one_hot)
    assert stats["entropy"].item() == pytest.approx(0, abs=1e-6) and stats["kl_uniform"].item() == pytest.approx(math.log(8))


def test_bad_constants_fail_at_construction():
    with pytest.raises(ValueError):
        DistillationCE(4, student_temp=0.0)
    with pytest.raises(ValueError):
        DistillationCE(4, center_momentum=1.5)
    with pytest.raises(ValueError):
        DistillationCE(4).teacher_probs(torch.randn(2, 4), 0.0)


def test_dropped_last_layer_gradients_leave_only_the_last_layer_unchanged():
    head = DINOHead(in_dim=10, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=2, norm_last_layer=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    last = [p.detach().clone() for p in head.last_layer.parameters()]
    first = head.mlp[0].weight.detach().clone()
    head(torch.randn(4, 10)).square().sum().backward()
    drop_last_layer_gradients([head])
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(last, head.last_layer.parameters()))
    assert not torch.equal(first, head.mlp[0].weight)
