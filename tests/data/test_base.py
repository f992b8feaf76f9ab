"""VolumeDataModule, the base of both data modules: the trainer's epoch reaches the training stream
through it alone, both modules check their shared arguments alike, and the segmentation stream with
subject-loading workers gives the batches of one without."""

from __future__ import annotations

import multiprocessing
from collections import defaultdict

import lightning as L
import pytest
import torch

from data_modules import DataSourceError, PretrainDataModule, VolumeDataModule
from data_modules.segmentation import SegmentationDataModule

MODULES = {"pretrain": PretrainDataModule, "segmentation": SegmentationDataModule}
TINY = dict(patch_size=16, samples_per_volume=2, queue_length=8, batch_size=2, num_workers=0, val_fraction=0.25)

# A queue that stops delivering hangs silently; fail instead.
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_module(phantom_datalist, cache_dir):
    def make(kind: str, **overrides) -> VolumeDataModule:
        module = MODULES[kind](datalist=str(phantom_datalist), cache_dir=str(cache_dir), **{**TINY, **overrides})
        module.setup()
        return module

    return make


def _batches(loader) -> list[tuple]:
    return [(batch["case_id"], batch["image"].clone(), batch.get("label")) for batch in loader]


def _same(ours: list[tuple], expected: list[tuple]) -> bool:
    return len(ours) == len(expected) > 0 and all(
        a[0] == b[0] and torch.equal(a[1], b[1]) and (a[2] is None or torch.equal(a[2], b[2]))
        for a, b in zip(ours, expected))


class _Recorder(L.LightningModule):
    """Records each epoch's training batches and tells the data module nothing (no set_epoch)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches: dict[int, list[tuple]] = defaultdict(list)

    def training_step(self, batch, batch_index):
        self.batches[self.current_epoch].append((batch["case_id"], batch["image"].clone(), batch.get("label")))
        return (batch["image"].mean() - self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_each_epoch_under_a_trainer_streams_that_epochs_batches(make_module, kind):
    """The base reads the trainer's epoch as each pass starts: epoch 2 of a fit gets the batches a
    stream set to epoch 2 gives, which are not epoch 0's."""
    model = _Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, use_distributed_sampler=False, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=make_module(kind))

    reference = make_module(kind)
    loader = reference.build_train_loader()
    expected = {}
    for epoch in range(3):
        reference.set_epoch(epoch)
        expected[epoch] = _batches(loader)
    assert not _same(expected[2], expected[0])  # the epoch matters, so a stream stuck at 0 would fail below
    for epoch in range(3):
        assert _same(model.batches[epoch], expected[epoch]), f"epoch {epoch}"


@pytest.mark.parametrize("argument", ["folder", "csv", "datalist"])
def test_a_missing_source_is_named_by_its_argument_in_one_line_before_any_work(tmp_path, argument):
    missing = tmp_path / "missing"
    messages = []
    for module_class in MODULES.values():
        module = module_class(**{argument: str(missing)}, cache_dir=str(tmp_path / "cache"))
        with pytest.raises(DataSourceError) as error:
            module.prepare_data()
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"data.{argument}: {missing}") and "does not exist" in messages[0]
    assert "\n" not in messages[0]
    assert not (tmp_path / "cache").exists()  # nothing was checked or cached


@pytest.mark.parametrize("bad, says", [
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"samples_per_volume": 0}, "samples_per_volume must be >= 1, got 0"),
    ({"queue_length": 0}, "queue_length must be >= 1, got 0"),
    ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
    ({"in_channels": 0}, "in_channels must be >= 1, got 0"),
    ({"on_bad_case": "ignore"}, "on_bad_case must be one of"),
    ({"patch_size": (16, 16)}, "patch_size must be"),
])
def test_shared_arguments_are_checked_alike_by_both_modules(bad, says):
    messages = []
    for module_class in MODULES.values():
        with pytest.raises(ValueError) as error:
            module_class(**bad)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and messages[0].startswith(says) and "\n" not in messages[0]


SHARED = {"preprocessing", "batch_size", "seed", "cache_dir", "in_channels", "phantom_root", "phantom_cases",
          "phantom_shape", "phantom_seed", "on_bad_case", "validation_limits", "cache_storage", "samples_per_volume"}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_the_shared_arguments_reach_the_command_line_and_the_module(kind):
    """The subclasses pass the shared arguments on through ``**kwargs``: LightningCLI must still offer
    them (with the base's defaults, the subclass's where it sets its own), and a value must arrive."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MODULES[kind], "data")
    defaults = vars(parser.get_defaults().data)
    assert SHARED <= set(defaults) and SHARED <= MODULES[kind].argument_names()
    assert defaults["num_workers"] == {"pretrain": 0, "segmentation": 2}[kind]
    assert defaults["queue_length"] == {"pretrain": 64, "segmentation": 32}[kind]
    # segmentation preprocesses with its queue workers; pre-training has a setting of its own
    assert ("preprocess_workers" in defaults) == (kind == "pretrain")
    module = MODULES[kind](phantom_cases=5, cache_storage="int16", seed=3)
    assert (module.phantom_cases, module.cache_storage, module.seed) == (5, "int16", 3)


def test_segmentation_queue_workers_give_the_in_process_batches_and_are_kept(make_module):
    """num_workers > 0 (the segmentation default): the subject-loading worker started in epoch 0
    serves epoch 1 too, and both epochs' batches (images, labels, augmentation) equal those of a
    stream without workers."""
    reference, module = make_module("segmentation"), make_module("segmentation", num_workers=1)
    reference_loader, loader = reference.build_train_loader(), module.build_train_loader()
    already_running = {process.pid for process in multiprocessing.active_children()}
    for epoch in range(2):
        reference.set_epoch(epoch)
        module.set_epoch(epoch)
        ours = _batches(loader)
        if epoch == 0:
            workers = {process.pid for process in multiprocessing.active_children()} - already_running
        assert _same(ours, _batches(reference_loader)), f"epoch {epoch}"
    assert len(workers) == 1
    assert {process.pid for process in multiprocessing.active_children()} - already_running == workers
