"""PretrainDataModule: batch format, the real TorchIO queue, per-rank shards, validation, errors, CLI types."""

from __future__ import annotations

import multiprocessing

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from volume_files import ct_volume, mapped_file, write_image

from data_modules import DataSourceError, Preprocessing, PretrainDataModule, read_cached_array, volume_subject
from data_modules.cache import MemoryMappedUniformSampler

TINY = dict(patch_size=16, samples_per_volume=2, queue_length=8, batch_size=2)

# A queue that stops delivering hangs silently; fail instead.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_module(phantom_datalist, cache_dir):
    def make(**overrides):
        module = PretrainDataModule(datalist=str(phantom_datalist), cache_dir=str(cache_dir), **{**TINY, **overrides})
        module.setup()
        return module

    return make


def _epoch(loader):
    return [batch for batch in loader]


def test_training_batches_have_the_documented_format(make_module):
    module = make_module(val_fraction=0.25)
    train_ids = {v.case_id for v in module.train_volumes}

    batches = _epoch(module.train_dataloader())

    assert len(train_ids) == 3 and len(batches) == 3  # 3 subjects x 2 patches / batch 2
    for batch in batches:
        assert set(batch) == {"image", "case_id"}
        assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["image"].dtype == torch.float32
        assert all(isinstance(c, str) for c in batch["case_id"]) and set(batch["case_id"]) <= train_ids
        assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert sorted(c for b in batches for c in b["case_id"]) == sorted(2 * list(train_ids))


def test_two_views_add_a_views_tensor_whose_first_view_is_the_image(make_module):
    module = make_module(patch_size=20, num_views=2, view_size=16, val_fraction=0.25)

    batch = next(iter(module.train_dataloader()))
    val_batch = next(iter(module.val_dataloader()))

    for b in (batch, val_batch):
        assert b["views"].shape == (len(b["case_id"]), 2, 1, 16, 16, 16)
        torch.testing.assert_close(b["image"], b["views"][:, 0])
    assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])


def test_queue_patches_are_views_of_the_cache_at_their_location(make_module):
    module = make_module(val_fraction=0)
    volume = module.train_volumes[0]
    sampler = MemoryMappedUniformSampler(16)

    for patch in sampler(volume_subject(volume), num_patches=3):
        i0, j0, k0, i1, j1, k1 = patch["location"].tolist()
        cached, _ = read_cached_array(volume.image)
        np.testing.assert_array_equal(patch["image"].data.numpy(), cached[:, i0:i1, j0:j1, k0:k1])
        assert mapped_file(patch["image"].data.data_ptr()) == str(volume.image)  # no copy until collate
        assert patch["case_id"] == volume.case_id


@pytest.mark.parametrize("extra_subjects", [0, 1])
def test_two_ranks_get_disjoint_shards_and_the_same_number_of_batches(
    phantom_datalist, cache_dir, tmp_path, extra_subjects
):
    csv = tmp_path / "cases.csv"
    images = sorted((phantom_datalist.parent / "imagesTr").glob("*.nii.gz"))
    rows = [f"{p},{p.name[:-7]}" for p in images] + [f"{images[0]},repeat{i}" for i in range(extra_subjects)]
    csv.write_text("image,case_id\n" + "\n".join(rows) + "\n")
    module = PretrainDataModule(csv=str(csv), cache_dir=str(cache_dir), val_fraction=0, **TINY)
    module.setup()
    subjects = {v.case_id for v in module.train_volumes}

    shards = []
    for rank in (0, 1):
        batches = _epoch(module.build_train_loader(rank=rank, world_size=2))
        shards.append((len(batches), {c for b in batches for c in b["case_id"]}))

    (batches_0, ids_0), (batches_1, ids_1) = shards
    assert batches_0 == batches_1
    assert ids_0 | ids_1 == subjects
    if len(subjects) % 2 == 0:
        assert not ids_0 & ids_1
    else:  # DistributedSampler pads by repeating: exactly one subject is on both ranks
        assert len(ids_0 & ids_1) == 1


def test_set_epoch_reshuffles_the_shards_and_is_safe_before_any_loader(make_module):
    module = make_module(val_fraction=0)
    module.set_epoch(5)  # no loader yet: must not fail

    def shard(epoch):
        module.set_epoch(epoch)
        loader = module.build_train_loader(rank=0, world_size=2)
        return tuple(sorted({c for b in loader for c in b["case_id"]}))

    shards = [shard(epoch) for epoch in range(6)]
    assert len(set(shards)) > 1
    assert shard(2) == shards[2]  # the same epoch gives the same shard


def test_validation_patches_are_fixed_held_out_and_shared_by_test_and_predict(make_module):
    module = make_module(val_fraction=0.5, val_samples_per_volume=3)
    val_ids = {v.case_id for v in module.val_volumes}

    first = _epoch(module.val_dataloader())
    second = _epoch(module.val_dataloader())

    assert len(val_ids) == 2 and not val_ids & {v.case_id for v in module.train_volumes}
    assert sum(len(b["case_id"]) for b in first) == 6
    for a, b, c in zip(first, second, _epoch(module.test_dataloader())):
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["image"], c["image"])
        assert set(a["case_id"]) <= val_ids
    assert not torch.equal(first[0]["image"][0], first[0]["image"][1])  # different positions per sample


def test_without_a_source_the_phantom_cohort_is_used_and_described(tmp_path):
    module = PretrainDataModule(
        phantom_root=str(tmp_path / "phantoms"),
        phantom_cases=3,
        phantom_shape=(32, 32, 16),
        cache_dir=str(tmp_path / "cache"),
        **TINY,
    )
    module.prepare_data()
    module.setup()
    description = module.describe()

    assert description["sources"]["phantoms"] and description["num_cases"] == 3 and description["num_train_cases"] == 2
    assert description["modality"] == "ct" and description["spacing"] == [1.5, 1.5, 2.0]
    assert description["patch_size"] == [16, 16, 16] and description["preprocessing"]["pad_to"] == [16, 16, 16]
    assert all(v.shape[1:] >= (16, 16, 16) for v in module.train_volumes)  # padded so every patch fits


def test_a_bad_file_fails_setup_with_every_problem_listed(tmp_path):
    write_image(tmp_path / "data" / "good.nii.gz", ct_volume())
    (tmp_path / "data" / "broken.nii.gz").write_bytes(b"")
    (tmp_path / "data" / "cut.nii.gz").write_bytes((tmp_path / "data" / "good.nii.gz").read_bytes()[:300])
    module = PretrainDataModule(folder=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), **TINY)

    with pytest.raises(DataSourceError) as error:
        module.setup()
    message = str(error.value)
    assert "2 of 3 case(s) cannot be used" in message
    assert f"{tmp_path / 'data' / 'broken.nii.gz'}: file is empty" in message
    assert f"{tmp_path / 'data' / 'cut.nii.gz'}: compressed data is truncated" in message


def test_constructor_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="view_size 24 must fit inside patch_size"):
        PretrainDataModule(patch_size=16, num_views=2, view_size=24)
    with pytest.raises(ValueError, match="unknown preprocessing preset"):
        PretrainDataModule(preprocessing="ct_abdomen")
    with pytest.raises(ValueError, match="val_fraction"):
        PretrainDataModule(val_fraction=1.0)
    with pytest.raises(RuntimeError, match="setup"):
        PretrainDataModule().train_dataloader()


def test_cli_types_accept_a_preset_name_or_full_settings():
    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")

    by_name = parser.parse_args(["--data.preprocessing=ct_wide_pretrain", "--data.patch_size=[96,96,64]"])
    by_fields = parser.parse_args(
        ['--data.preprocessing={"modality": "mri", "intensity": "zscore_nonzero", "spacing": [1, 1, 1]}',
         "--data.augmentation.flip_prob=0.5"]
    )
    modules = [parser.instantiate_classes(config).data for config in (by_name, by_fields)]

    assert modules[0].preprocessing.window == (-1000.0, 1000.0) and modules[0].patch_size == (96, 96, 64)
    expected = Preprocessing(modality="mri", intensity="zscore_nonzero", spacing=(1, 1, 1), pad_to=(96, 96, 96))
    assert modules[1].preprocessing == expected
    assert modules[1].augmentation.flip_prob == 0.5


def test_queue_workers_receive_importable_lazy_subjects(make_module):
    module = make_module(val_fraction=0, num_workers=1)
    batches = _epoch(module.train_dataloader())
    assert len(batches) == 4 and all(b["image"].shape == (2, 1, 16, 16, 16) for b in batches)


def test_queue_workers_outlive_the_epoch_and_the_batches_stay_those_of_an_in_process_loader(make_module):
    """The subject-loading workers started in epoch 0 serve the later epochs (none is started per
    epoch), and every epoch's batches - after an epoch left early too, and on resume - are exactly
    those of a loader without workers."""
    def run_epoch(module, loader, number, batches=None):
        module.set_epoch(number)
        taken = []
        for batch in loader:
            taken.append((batch["case_id"], batch["image"].clone()))
            if len(taken) == batches:
                break
        return taken

    reference_module = make_module(val_fraction=0)
    reference_loader = reference_module.build_train_loader()
    reference = [run_epoch(reference_module, reference_loader, number) for number in range(3)]

    module = make_module(val_fraction=0, num_workers=2)
    loader = module.build_train_loader()
    already_running = {process.pid for process in multiprocessing.active_children()}
    epochs = [run_epoch(module, loader, 0)]
    workers = {process.pid for process in multiprocessing.active_children()} - already_running
    run_epoch(module, loader, 1, batches=1)  # left early: the workers drop what they had prefetched
    epochs += [run_epoch(module, loader, 1), run_epoch(module, loader, 2)]
    loader.load_state_dict({"epoch": 2, "batches": 1})
    resumed = run_epoch(module, loader, 2)

    assert len(workers) == 2
    assert {process.pid for process in multiprocessing.active_children()} - already_running == workers
    for ours, expected in zip([*epochs, resumed], [*reference, reference[2][1:]], strict=True):
        assert len(ours) == len(expected) >= 3
        assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(ours, expected))


class _MeanModel(L.LightningModule):
    """Records the subjects it saw; the data module takes each epoch from the trainer itself."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[str] = []

    def training_step(self, batch, batch_index):
        self.seen += batch["case_id"]
        return (batch["image"].mean() - self.weight) ** 2

    def validation_step(self, batch, batch_index):
        self.log("val/loss", (batch["image"].mean() - self.weight) ** 2, batch_size=len(batch["case_id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_trainer_runs_epochs_and_validation(make_module):
    module, model = make_module(val_fraction=0.25), _MeanModel()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    trainer.fit(model, datamodule=module)

    assert trainer.global_step == 6 and len(model.seen) == 12
    assert set(model.seen) == {v.case_id for v in module.train_volumes}
    assert "val/loss" in trainer.callback_metrics


def test_a_compact_cache_gives_float32_batches_close_to_the_exact_ones(make_module):
    exact, compact = make_module(val_fraction=0.5), make_module(val_fraction=0.5, cache_storage="int16")
    assert [v.case_id for v in compact.val_volumes] == [v.case_id for v in exact.val_volumes]
    for ours, reference in zip(compact.val_dataloader(), exact.val_dataloader()):  # fixed patches: same positions
        assert ours["image"].dtype == torch.float32
        assert (ours["image"] - reference["image"]).abs().max() <= 1e-4  # int16 over a [0, 1] window: ≤ 7.6e-6
    batch = next(iter(compact.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="cache_storage"):
        PretrainDataModule(cache_storage="bfloat16")
