"""SegmentationDataModule (label fractions, sampling, sharding) and SegmentationModule (optimisation, CLI runs)."""

import csv
import json
import random
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data_modules.segmentation import (
    SegmentationAugmentation,
    SegmentationDataModule,
    cases_from_paired_folders,
    labelled_subset,
)
from data_modules.sources import Case, DataSourceError
from lightning_mim.cli import main
from lightning_mim.segmentation.module import TEST_CSV, TEST_SUMMARY, SegmentationModule

TINY_UNETR = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "qkv_bias": True, "feature_size": 8}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("segdata")
    return {"phantom_root": str(root / "phantoms"), "cache_dir": str(root / "cache")}


def phantom_module(data_dirs, **kwargs) -> SegmentationDataModule:
    args = dict(patch_size=32, num_workers=0, batch_size=2, samples_per_volume=2, queue_length=4, phantom_cases=6,
                phantom_shape=(48, 48, 24), val_fraction=0.34, **data_dirs)
    args.update(kwargs)
    module = SegmentationDataModule(**args)
    module.setup()
    return module


# --------------------------------------------------------------------------- label fractions
def test_label_fraction_picks_the_same_nested_cases_for_a_seed():
    cases = [Case(f"case_{i:02d}", Path(f"{i}.nii.gz")) for i in range(20)]
    shuffled = list(reversed(cases))
    ids = lambda subset: [c.case_id for c in subset]  # noqa: E731
    tenth = labelled_subset(cases, 0.1, seed=3)
    assert ids(tenth) == ids(labelled_subset(shuffled, 0.1, seed=3))  # discovery order does not matter
    half = labelled_subset(cases, 0.5, seed=3)
    assert len(tenth) == 2 and len(half) == 10 and ids(half)[:2] == ids(tenth)  # nested
    assert ids(labelled_subset(cases, count=5, seed=3)) == ids(half)[:5]
    assert ids(labelled_subset(cases, 0.5, seed=4)) != ids(half)
    with pytest.raises(ValueError, match="num_labelled"):
        labelled_subset(cases, count=21)


def test_data_module_classes_split_and_subset(data_dirs):
    dm = phantom_module(data_dirs, num_labelled=2, seed=1)
    assert dm.class_names[0] == "background" and dm.class_names[1] == "liver" and dm.num_classes == 9
    val = {v.case_id for v in dm.splits["val"]}
    assert len(val) == 2 and not val & {c.case_id for c in dm.all_train_cases}
    assert dm.splits["test"] == dm.splits["val"]
    again = phantom_module(data_dirs, num_labelled=2, seed=1)
    assert again.labelled_case_ids == dm.labelled_case_ids
    described = dm.describe()
    assert described["num_labelled"] == 2 and described["label_fraction"] == 0.5 and described["seed"] == 1
    geometry = dm.original_geometry(dm.labelled_case_ids[0])
    assert geometry["shape"] == [48, 48, 24] and Path(geometry["source"]).is_file()


def test_training_patches_are_label_aware(data_dirs):
    only_foreground = phantom_module(data_dirs, pos_neg_ratio=1e6, augmentation=None)
    random.seed(5)
    np.random.seed(7)
    before = random.getstate(), np.random.get_state()[1].copy()
    batches = list(only_foreground.train_dataloader())
    # the resumable stream swaps only torch's generator: a draw from Python's or NumPy's would escape it
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert batches and all(b["image"].shape == (2, 1, 32, 32, 32) and b["label"].dtype == torch.int64 for b in batches)
    for batch in batches:  # every patch is centred on an organ voxel, so every patch holds one
        assert bool(((batch["label"] > 0).flatten(1).any(1)).all())
    assert int(batches[0]["label"].max()) < only_foreground.num_classes


def test_augmentation_moves_image_and_label_together():
    label = torch.randint(0, 5, (1, 16, 16, 8))
    augment = SegmentationAugmentation(flip_prob=0.5, rotate90_prob=1.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        image, moved = augment(label.float(), label, generator)
        assert torch.equal(image, moved.float())
    with pytest.raises(ValueError, match="rotate90"):
        SegmentationDataModule(patch_size=(32, 48, 32))


def test_evaluation_volumes_are_split_between_ranks_without_padding(data_dirs):
    dm = phantom_module(data_dirs, val_fraction=0.5)
    everything = [b["case_id"][0] for b in dm.volume_loader("val")]
    shards = [[b["case_id"][0] for b in dm.volume_loader("val", rank, 2)] for rank in range(2)]
    assert len(everything) == 3 and sorted(shards[0] + shards[1]) == sorted(everything)
    assert not set(shards[0]) & set(shards[1])
    batch = next(iter(dm.volume_loader("val")))
    assert batch["label"].shape[:2] == (1, 1) and batch["image"].shape[2:] == batch["label"].shape[2:]
    assert batch["spacing"].tolist() == [[1.5, 1.5, 2.0]]


@pytest.mark.parametrize("storage", ["int16", "float32_blosc2"])
def test_evaluation_volumes_of_a_compact_or_compressed_cache_are_float32_intensities(data_dirs, storage):
    exact, other = phantom_module(data_dirs, val_fraction=0.5), phantom_module(data_dirs, val_fraction=0.5,
                                                                                cache_storage=storage)
    for ours, reference in zip(other.volume_loader("val"), exact.volume_loader("val"), strict=True):
        assert ours["case_id"] == reference["case_id"] and ours["image"].dtype == torch.float32
        assert (ours["image"] - reference["image"]).abs().max() <= 1e-4  # int16 levels were once returned raw
        assert torch.equal(ours["label"], reference["label"])


def test_training_subjects_are_sharded_and_reshuffled_per_epoch(data_dirs):
    dm = phantom_module(data_dirs, num_workers=0, augmentation=None)
    loaders = [dm.build_train_loader(rank=rank, world_size=2) for rank in range(2)]
    subjects = {v.case_id for v in dm.splits["train"]}

    def shards(epoch: int) -> list[set[str]]:
        dm.set_epoch(epoch)
        return [{case for batch in loader for case in batch["case_id"]} for loader in loaders]

    per_epoch = [shards(epoch) for epoch in range(4)]
    for rank_0, rank_1 in per_epoch:  # 4 subjects: disjoint halves
        assert rank_0 | rank_1 == subjects and not rank_0 & rank_1
    assert len({frozenset(rank_0) for rank_0, _ in per_epoch}) > 1  # a new shard per epoch
    assert shards(2) == per_epoch[2]  # the same epoch gives the same shard
    assert len(loaders[0].dataset) == len(subjects) // 2 * dm.samples_per_volume


def test_paired_folders(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        for name in ("a", "b"):
            nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / sub / f"{name}.nii.gz")
    assert [(c.case_id, c.label.name) for c in cases_from_paired_folders(tmp_path)] == [("a", "a.nii.gz"), ("b", "b.nii.gz")]
    (tmp_path / "labels" / "b.nii.gz").unlink()
    with pytest.raises(DataSourceError, match="unmatched: b"):
        cases_from_paired_folders(tmp_path)


# --------------------------------------------------------------------------- the module
def _fake_trainer(steps_per_epoch: int, epochs: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(max_steps=-1, max_epochs=epochs, num_training_batches=steps_per_epoch,
                                 accumulate_grad_batches=1)


def test_layer_decay_and_encoder_freeze():
    model = SegmentationModule(num_classes=3, network_kwargs=TINY_UNETR, roi_size=32, lr=1e-3, layer_decay=0.5,
                               warmup_epochs=0, freeze_encoder_epochs=2)
    model._trainer = _fake_trainer(steps_per_epoch=4, epochs=10)  # encoder frozen for 8 steps
    groups = model.parameter_groups()
    scales = {g["lr_scale"] for g in groups if g["encoder"]}
    assert max(scales) == 0.5 and min(scales) == pytest.approx(0.5**14)
    assert {g["lr_scale"] for g in groups if not g["encoder"]} == {1.0}
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert any(p is model.network.vit.patch_embedding.position_embeddings for g in no_decay for p in g["params"])
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    encoder = [i for i, g in enumerate(optimizer.param_groups) if g["encoder"]]
    decoder = [i for i, g in enumerate(optimizer.param_groups) if not g["encoder"]]
    for step in range(10):
        lrs = [g["lr"] for g in optimizer.param_groups]
        frozen = step < 8
        assert all((lrs[i] == 0.0) == frozen for i in encoder), step
        assert all(lrs[i] > 0 for i in decoder)
        optimizer.step()
        scheduler.step()


def test_module_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationModule(num_classes=1)
    with pytest.raises(ValueError, match="divisible by 16"):
        SegmentationModule(num_classes=3, network_kwargs=TINY_UNETR, roi_size=40)
    with pytest.raises(ValueError, match="unknown segmentation network"):
        SegmentationModule(num_classes=3, network="vnet")


def test_fit_test_predict_through_the_cli(tmp_path, data_dirs):
    """Fine-tune from scratch, test (CSV + Markdown with method / label fraction) and predict NIfTI via the CLI."""
    base = ["--config", "experiments/finetune_phantoms.yaml", "--config", "tests/configs/finetune_tiny.yaml",
            "--data.init_args.phantom_root", data_dirs["phantom_root"], "--data.init_args.cache_dir", data_dirs["cache_dir"],
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.id", "tiny"]
    main(["fit", *base])
    import wandb

    wandb.finish()
    run = tmp_path / "lightning-mim" / "tiny"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    state = torch.load(checkpoint, weights_only=False)
    (monitor,) = [v for k, v in state["callbacks"].items() if "val/dice" in k]
    assert monitor["monitor"] == "val/dice" and 0.0 <= float(monitor["best_model_score"]) <= 1.0  # validation ran
    assert state["global_step"] == 4

    main(["test", *base, "--ckpt_path", str(checkpoint)])
    wandb.finish()
    with open(run / TEST_CSV) as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"scratch"} and {r["label_fraction"] for r in rows} == {"0.6667"}
    assert len(rows) == 2 * 8 and {r["organ"] for r in rows} >= {"liver", "spleen"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows if r["dice"] != "nan")
    assert "Mean Dice over organs" in (run / TEST_SUMMARY).read_text()
    assert list((tmp_path / "wandb").glob(f"*run-*tiny/files/{TEST_CSV}"))  # travels with the W&B run

    main(["predict", *base, "--ckpt_path", str(checkpoint), "--model.init_args.prediction_dir", str(tmp_path / "pred")])
    wandb.finish()
    predictions = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(predictions) == 2
    source = Path(data_dirs["phantom_root"]).glob(f"*/imagesTr/{predictions[0].name}")
    reference, written = nib.load(next(source)), nib.load(predictions[0])
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(written.dataobj))) <= set(range(9))


def test_btcv_style_datalist_with_a_validation_list_and_full_organ_names(data_dirs, tmp_path):
    phantoms = phantom_module(data_dirs)  # generates the cohort; reuse its files in a dataset_0.json layout
    cases = sorted(phantoms.all_train_cases + [Case(v.case_id, Path(v.meta["source"]["image"]), Path(v.meta["source"]["label"]))
                                               for v in phantoms.splits["val"]], key=lambda c: c.case_id)
    entry = lambda c: {"image": str(c.image), "label": str(c.label)}  # noqa: E731
    organs = ["liver", "spleen", "right kidney", "left kidney", "aorta", "stomach", "pancreas", "spine"]
    datalist = {"labels": {"0": "background", **{str(i): name for i, name in enumerate(organs, start=1)}},
                "training": [entry(c) for c in cases[:4]], "validation": [entry(c) for c in cases[4:]],
                "test": [str(tmp_path / "unlabelled.nii.gz")]}
    (tmp_path / "unlabelled.nii.gz").write_bytes(cases[0].image.read_bytes())
    (tmp_path / "dataset_0.json").write_text(json.dumps(datalist))
    dm = SegmentationDataModule(datalist=str(tmp_path / "dataset_0.json"), patch_size=32, num_workers=0,
                                predict_key="test", cache_dir=data_dirs["cache_dir"], label_fraction=0.5)
    dm.setup()
    assert [v.case_id for v in dm.splits["val"]] == [c.case_id for c in cases[4:]]
    assert len(dm.splits["train"]) == 2 and len(dm.splits["predict"]) == 1 and dm.splits["predict"][0].label is None
    assert dm.class_names == ["background", *organs] and dm.num_classes == 9
    named = SegmentationDataModule(datalist=str(tmp_path / "dataset_0.json"), class_names=list("abcdefgh"), patch_size=32)
    assert named.class_names == ["background", *"abcdefgh"]
