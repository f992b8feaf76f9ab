"""Resume edge cases: which checkpoint auto-resume picks, and preemption inside gradient accumulation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from reliability_probes import REPO

from lightning_mim.cli import main
from lightning_mim.reliability.resume import resume_checkpoint

CONFIGS = REPO / "tests" / "configs"


def test_auto_resume_takes_the_newest_of_last_and_the_slurm_hpc_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_2.ckpt"
    assert resume_checkpoint(run, run) is None
    last.write_bytes(b"x")
    assert resume_checkpoint(run, run) == str(last)
    hpc.write_bytes(b"x")
    os.utime(last, (1000, 1000))
    os.utime(hpc, (2000, 2000))
    assert resume_checkpoint(run, run) == "hpc"  # Lightning then loads the highest-numbered hpc_ckpt
    os.utime(last, (3000, 3000))
    assert resume_checkpoint(run, run) == str(last)


def records(path: Path) -> list[tuple[int, list[str], float]]:
    return [(r["step"], r["case_id"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.timeout(600)
def test_preemption_inside_gradient_accumulation_trains_every_micro_batch_once(tmp_path):
    """4 micro-batches, 2 per optimizer step: SIGUSR1 at the first micro-batch of step 0 lets the
    cycle finish (its optimizer step), then stops; the resumed run trains exactly the other two, and
    the micro-batch sequence (cases, losses, steps) is the uninterrupted run's."""
    def fit(run: str, losses: Path, *extra: str) -> int:
        return main(["fit", "--config", str(REPO / "experiments/mae.yaml"), "--config", str(CONFIGS / "mae_tiny.yaml"),
                     "--config", str(CONFIGS / "reliability_resume.yaml"), "--trainer.max_epochs", "1",
                     "--trainer.accumulate_grad_batches", "2", "--data.init_args.samples_per_volume", "4",
                     "--trainer.default_root_dir", str(tmp_path / run),
                     "--data.init_args.phantom_root", str(tmp_path / "phantoms"),
                     "--data.init_args.cache_dir", str(tmp_path / "cache"),
                     "--trainer.callbacks+=reliability_probes.LossRecorder", "--trainer.callbacks.init_args.path",
                     str(losses), "--trainer.callbacks+=reliability_probes.SignalAtStep",
                     "--trainer.callbacks.init_args.step_file", str(tmp_path / f"{run}.signal"), *extra])

    assert fit("reference", tmp_path / "reference.jsonl") == 0
    reference = records(tmp_path / "reference.jsonl")
    assert len(reference) == 4 and [step for step, _, _ in reference] == [0, 1, 1, 2]  # steps after each micro-batch

    (tmp_path / "split.signal").write_text("0")
    assert fit("split", tmp_path / "split.jsonl") == 0
    stopped = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert stopped["global_step"] == 1  # after the cycle's optimizer step, not in the middle of it
    assert len(records(tmp_path / "split.jsonl")) == 2
    (tmp_path / "split.signal").unlink()
    assert fit("split", tmp_path / "split.jsonl", "--ckpt_path", "last") == 0
    assert records(tmp_path / "split.jsonl") == reference


def test_a_finetuned_checkpoint_loads_after_its_encoder_file_is_gone(tmp_path):
    """The fine-tuned checkpoint holds the weights; the encoder file it started from is provenance only."""
    import lightning

    from lightning_mim.methods.mae import MAE3D
    from lightning_mim.segmentation.module import SegmentationModule
    from lightning_mim.segmentation.weights import export_module, save_encoder

    torch.manual_seed(0)
    mae = MAE3D(img_size=32, embed_dim=48, depth=12, num_heads=4, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    encoder = save_encoder(export_module(mae, data={"modality": "ct"}, config={}), tmp_path / "encoder.pt")
    model = SegmentationModule(num_classes=3, pretrained=str(encoder), roi_size=32, network_kwargs={"feature_size": 8})
    checkpoint = tmp_path / "finetuned.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": lightning.__version__}, checkpoint)
    encoder.unlink()

    restored = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    assert restored.hparams.pretrained_from == str(encoder) and restored.method_name == model.method_name
    assert restored.network_name == model.network_name and restored.load_report is None
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_the_private_lightning_fetcher_resume_state_restarts_still_means_the_same(tmp_path):
    """ResumeState restarts ``trainer.fit_loop._data_fetcher`` (Lightning has no public way): on a
    Lightning where that attribute is gone or no longer restarts the training stream, fail here."""
    import lightning
    import tomllib
    from lightning.pytorch.demos.boring_classes import BoringModel
    from packaging.specifiers import SpecifierSet

    from lightning_mim.reliability.resume import TESTED_LIGHTNING

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"lightning{TESTED_LIGHTNING}" in [pin.replace(" ", "") for pin in pins]
    assert lightning.__version__ in SpecifierSet(TESTED_LIGHTNING), f"lightning {lightning.__version__} is not tested"

    seen = {}

    class Check(lightning.Callback):
        def on_train_start(self, trainer, pl_module):
            fetcher = trainer.fit_loop._data_fetcher
            first = next(fetcher)[0]
            next(fetcher)
            iter(fetcher)  # what ResumeState does: the stream starts again from the loader's position
            seen["restarted"] = torch.equal(next(fetcher)[0], first)
            iter(fetcher)

    trainer = lightning.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Check()])
    trainer.fit(BoringModel())
    assert seen == {"restarted": True}
