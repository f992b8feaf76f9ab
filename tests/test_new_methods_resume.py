"""Exact resume of in-step randomness: crops, corruptions and masks are drawn from the global step, so a
run resumed from a checkpoint repeats the losses of an uninterrupted run (teacher and centres included)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_mim.methods.dinov2 import DINOv2
from lightning_mim.methods.models_genesis import ModelsGenesis

BUILDERS = {
    "dinov2": (lambda: DINOv2(img_size=32, local_size=16, num_local_crops=2, patch_size=8, embed_dim=24, depth=2,
                              num_heads=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.0,
                              warmup_epochs=0), (32, 32, 32)),
    "models_genesis": (lambda: ModelsGenesis(img_size=(32, 32, 16), unet_channels=[4, 8, 8, 16], shuffle_blocks=100,
                                             warmup_epochs=0), (32, 32, 16)),
}


class Patches(Dataset):
    def __init__(self, size):
        self.size = size

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.rand(1, *self.size, generator=torch.Generator().manual_seed(index))}


class Losses(L.Callback):
    """Records the loss of every step; optionally checkpoints after step ``save_at`` (the later resume point)."""

    def __init__(self, save_at: int | None = None, path=None) -> None:
        self.values: dict[int, float] = {}
        self.save_at, self.path = save_at, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def fit(name: str, root, ckpt_path=None, save_at=None, save_path=None) -> dict[int, float]:
    """Two epochs of two steps (the schedules' length is the same for every run)."""
    L.seed_everything(0)
    build, size = BUILDERS[name]
    recorder = Losses(save_at, save_path)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[recorder],
                        enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(build(), DataLoader(Patches(size), batch_size=2), ckpt_path=ckpt_path)
    return recorder.values


@pytest.mark.parametrize("name", list(BUILDERS))
def test_resumed_run_repeats_the_uninterrupted_losses(name, tmp_path):
    checkpoint = tmp_path / "step2.ckpt"
    full = fit(name, tmp_path / "full", save_at=2, save_path=checkpoint)
    resumed = fit(name, tmp_path / "resumed", ckpt_path=checkpoint)
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], rel=1e-5, abs=1e-6)


def test_step_generator_depends_on_seed_step_and_stage_only():
    """What makes the resume exact: the same (seed, step, stage) draws the same, whatever ran before."""
    method = BUILDERS["models_genesis"][0]()

    def draw(seed: int = 0) -> torch.Tensor:
        return torch.rand(4, generator=method.step_generator(seed))

    first = draw()
    torch.rand(100)  # the global stream moves; the step's stream must not
    assert torch.equal(draw(), first)
    assert not torch.equal(draw(seed=1), first)
    method.eval()
    assert not torch.equal(draw(), first)  # validation draws its own stream
    method.train()
    assert torch.equal(draw(), first)
