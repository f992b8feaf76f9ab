"""NT-Xent (losses/contrastive.py)."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_mim.losses.contrastive import nt_xent


def reference_nt_xent(a, b, temperature):
    """The SimCLR definition written out with loops: row i's positive is its twin, itself is excluded."""
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        twin = (i + n2 // 2) % n2
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[twin]) / temperature) / denominator)
    return total / n2


def test_orthogonal_pair_gives_the_closed_form_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Each row: positive similarity 1, two negatives of similarity 0 → log(1 + 2·e^{-1/τ}) with τ = 0.5.
    assert nt_xent(a, a.clone(), 0.5).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)


def test_matches_the_definition_on_a_small_batch():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    assert nt_xent(a, b, 0.5).item() == pytest.approx(reference_nt_xent(a, b, 0.5), rel=1e-5)
    assert nt_xent(a, b, 0.1).item() == pytest.approx(reference_nt_xent(a, b, 0.1), rel=1e-5)


def test_loss_falls_when_the_two_branches_agree():
    torch.manual_seed(1)
    a = torch.randn(4, 16)
    noisy = a + 2.0 * torch.randn(4, 16)
    unrelated = torch.randn(4, 16)
    assert nt_xent(a, a + 0.01 * torch.randn(4, 16)) < nt_xent(a, noisy) < nt_xent(a, unrelated)


def test_gather_is_a_noop_outside_distributed_and_inputs_are_checked():
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(nt_xent(a, b, gather_negatives=True), nt_xent(a, b))
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(a, torch.randn(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(a, b, 0.0)


def _rank_worker(rank, world, init_file, a, b, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n = a.shape[0] // world
    local_a = a[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = nt_xent(local_a, b[rank * n:(rank + 1) * n], 0.5, gather_negatives=True)
    loss.backward()
    results[rank] = (loss.item(), local_a.grad.abs().sum().item())
    torch.distributed.destroy_process_group()


def test_gathered_negatives_reproduce_the_global_batch_loss(tmp_path):
    torch.manual_seed(2)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), a, b, results), nprocs=2)
        losses = [results[r][0] for r in range(2)]
        grads = [results[r][1] for r in range(2)]
    assert sum(losses) / 2 == pytest.approx(nt_xent(a, b).item(), rel=1e-5)
    assert all(g > 0 for g in grads)


def test_similarities_stay_float32_under_bf16_autocast():
    torch.manual_seed(4)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(a, b, 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_nt_xent(a, b, 0.1), rel=1e-5)
