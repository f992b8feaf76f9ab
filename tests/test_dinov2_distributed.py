"""DINOv2 blocks across 2 gloo processes: Sinkhorn-Knopp and the patch centre see the global batch,
also when one rank holds no masked token; KoLeo on gathered rows equals KoLeo of the whole batch."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from lightning_mim.losses.dinov2 import (
    all_reduced_mean_rows,
    gather_rows,
    koleo_loss,
    sinkhorn_knopp,
)


def _worker(rank, world, init_file, logits, features, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = logits.shape[0] // world
    local = logits[rank * half:(rank + 1) * half]
    q = sinkhorn_knopp(local, 0.5)
    empty_rank_mean = all_reduced_mean_rows(logits[:3] if rank == 0 else logits[:0])  # rank 1 has no rows
    koleo = koleo_loss(gather_rows(features[rank * 2:(rank + 1) * 2]))
    results[rank] = (q, empty_rank_mean, koleo.item())
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_reproduce_the_global_batch(tmp_path):
    torch.manual_seed(0)
    logits, features = torch.randn(6, 4), torch.randn(4, 5)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp_path / "init"), logits, features, results), nprocs=2)
        out = [results[r] for r in range(2)]
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), sinkhorn_knopp(logits, 0.5))
    for rank in range(2):
        torch.testing.assert_close(out[rank][1], logits[:3].mean(0))
        assert out[rank][2] == pytest.approx(koleo_loss(features).item(), rel=1e-5)
