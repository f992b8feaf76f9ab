"""A user's own folder, as the README's "your data" section walks it: check-data on images with label
maps side by side, and predict on a folder, a file and a DICOM series with one argument."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from volume_files import ct_volume, write_dicom_series, write_image

from data_modules import read_image
from lightning_mim.cli import main

REPO = Path(__file__).resolve().parent.parent
FINETUNE = ["--config", str(REPO / "experiments/finetune_phantoms.yaml"),
            "--config", str(REPO / "tests/configs/finetune_tiny.yaml")]
SERIES = "1.2.826.0.1.3680043.2.1125.9"
SHAPE = (40, 40, 24)


def organs(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[10:20, 10:20, 6:12] = 1
    label[22:30, 20:30, 8:16] = 2
    return label


def test_check_data_pairs_side_by_side_labels_and_never_reads_them_as_images(tmp_path, capsys):
    data = tmp_path / "mine"
    for index in range(3):
        write_image(data / f"case{index}_image.nii.gz", ct_volume(SHAPE, seed=index), spacing=(1.5, 1.5, 2.0))
        write_image(data / f"case{index}_label.nii.gz", organs(), spacing=(1.5, 1.5, 2.0))
    report = tmp_path / "report.json"
    code = main(["check-data", *FINETUNE, "--data.init_args.folder", str(data), "--data.init_args.class_names",
                 "[liver, spleen]", "--data.init_args.cache_dir", str(tmp_path / "cache"), "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0 and "3 of 3 case(s) ok, 0 bad" in out
    cases = {case["case_id"]: case for case in json.loads(report.read_text())["cases"]}
    assert {key: Path(case["label"]).name for key, case in cases.items()} == {
        f"case{i}_image": f"case{i}_label.nii.gz" for i in range(3)}
    assert all(case["label_values"] == [0, 1, 2] for case in cases.values())


def test_predict_new_images_with_one_argument_writes_each_in_its_input_geometry(tmp_path, capsys):
    new = tmp_path / "new"
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-stored: reoriented for the network, not on output
    write_image(new / "scan_a.nii.gz", ct_volume(SHAPE, seed=3), spacing=(1.2, 0.9, 3.0), origin=(5.0, -7.0, 30.0),
                direction=direction)
    write_image(new / "scan_a_seg.nii.gz", organs())  # a label file in the folder: never predicted on
    series = write_dicom_series(tmp_path / "dicom" / "ct", ct_volume((30, 26, 14), seed=4), SERIES)
    single = write_image(tmp_path / "single.nrrd", ct_volume(SHAPE, seed=5))
    output = tmp_path / "predictions"

    main(["predict", *FINETUNE, "--data.init_args.predict_images", f"[{new}, {series}, {single}]",
          "--data.init_args.cache_dir", str(tmp_path / "cache"), "--model.init_args.prediction_dir", str(output),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])

    out = capsys.readouterr().out
    written = {path.name: path for path in output.glob("*.nii.gz")}
    assert sorted(written) == ["ct.nii.gz", "scan_a.nii.gz", "single.nii.gz"]
    for source, name in ((new / "scan_a.nii.gz", "scan_a.nii.gz"), (series, "ct.nii.gz"), (single, "single.nii.gz")):
        assert f"predict: {source} -> {written[name]}" in out
        reference, prediction = read_image(source), nib.load(written[name])
        assert prediction.shape == reference.spatial_shape, name
        np.testing.assert_allclose(prediction.affine, reference.affine, atol=1e-4)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= set(range(9))


@pytest.mark.slow
def test_the_readme_walkthrough_from_check_data_to_predict_on_a_users_folder(tmp_path, capsys):
    """check-data → fit (a 2-block ViT) → export-encoder → fine-tune (ViTUNETR) → predict, on files written here.

    (The tiny MAE config replaces the callback list, so the encoder comes from export-encoder here.)"""
    import wandb

    mine = tmp_path / "my_ct"
    for index in range(3):
        write_image(mine / f"patient{index}_image.nii.gz", ct_volume(SHAPE, seed=index), spacing=(1.5, 1.5, 2.0))
        write_image(mine / f"patient{index}_label.nii.gz", organs(), spacing=(1.5, 1.5, 2.0))
    write_image(tmp_path / "new" / "patient9.nii.gz", ct_volume(SHAPE, seed=9), spacing=(0.8, 0.8, 2.5))
    cache = ["--data.init_args.cache_dir", str(tmp_path / "cache")]
    mae = ["--config", str(REPO / "experiments/mae.yaml"), "--config", str(REPO / "tests/configs/mae_tiny.yaml"),
           "--data.init_args.folder", str(mine), *cache]
    assert main(["check-data", *mae]) == 0
    assert "3 of 3 case(s) ok, 0 bad" in capsys.readouterr().out

    main(["fit", *mae, "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "my_mae")])
    wandb.finish()
    (run,) = (tmp_path / "my_mae" / "lightning-mim").iterdir()
    assert main(["export-encoder", "--checkpoint", str(run / "checkpoints" / "last.ckpt"),
                 "--output", str(tmp_path / "encoder.pt")]) == 0

    finetune = [*FINETUNE, "--data.init_args.folder", str(mine), "--data.init_args.class_names", "[liver, spleen]",
                "--model.init_args.num_classes", "3", "--data.init_args.val_fraction", "0.34", *cache]
    capsys.readouterr()
    main(["fit", *finetune, "--model.init_args.pretrained", str(tmp_path / "encoder.pt"), "--trainer.max_steps", "2",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "ft_mae")])
    wandb.finish()
    (ft_run,) = (tmp_path / "ft_mae" / "lightning-mim").iterdir()
    main(["predict", *finetune, "--ckpt_path", str(ft_run / "checkpoints" / "last.ckpt"),
          "--data.init_args.predict_images", str(tmp_path / "new"),
          "--model.init_args.prediction_dir", str(tmp_path / "predictions"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "ft_mae")])
    wandb.finish()
    out = capsys.readouterr().out
    prediction = tmp_path / "predictions" / "patient9.nii.gz"
    assert f"predict: {tmp_path / 'new' / 'patient9.nii.gz'} -> {prediction}" in out
    assert nib.load(prediction).shape == SHAPE
    assert set(np.unique(np.asarray(nib.load(prediction).dataobj))) <= {0, 1, 2}
