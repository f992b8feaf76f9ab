"""Label maps are never images: naming conventions, pairing with their images, and the label-map look."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from volume_files import ct_volume, write_dicom_series, write_image

from data_modules import DataSourceError, cases_from_folder
from data_modules.segmentation import cases_from_paired_folders
from data_modules.sources import label_marker
from data_modules.validation import label_map_problem

SERIES = "1.2.826.0.1.3680043.2.1125.7"


def organs(shape=(24, 20, 12)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[6:12, 5:10, 3:8] = 1
    label[14:20, 10:16, 4:9] = 2
    return label


def test_side_by_side_label_files_are_skipped_as_images_and_paired_when_asked(tmp_path):
    for case in ("p1", "p2"):
        write_image(tmp_path / f"{case}_image.nii.gz", ct_volume())
    write_image(tmp_path / "p1_label.nii.gz", organs())
    write_image(tmp_path / "p2_seg.nii.gz", organs())
    write_image(tmp_path / "p3.nii.gz", ct_volume())
    write_image(tmp_path / "p3_mask.nii.gz", organs())
    write_image(tmp_path / "case9" / "image.nii.gz", ct_volume())
    write_image(tmp_path / "case9" / "segmentation.nii.gz", organs())

    assert sorted(c.case_id for c in cases_from_folder(tmp_path)) == ["case9/image", "p1_image", "p2_image", "p3"]
    assert all(c.label is None for c in cases_from_folder(tmp_path))  # pre-training: images only

    paired = {c.case_id: c.label.relative_to(tmp_path).as_posix() for c in cases_from_folder(tmp_path, with_labels=True)}
    assert paired == {"p1_image": "p1_label.nii.gz", "p2_image": "p2_seg.nii.gz", "p3": "p3_mask.nii.gz",
                      "case9/image": "case9/segmentation.nii.gz"}
    assert {c.case_id for c in cases_from_paired_folders(tmp_path)} == set(paired)


def test_msd_layout_pairs_imagesTr_with_labelsTr_and_never_reads_labels_as_images(tmp_path):
    task = tmp_path / "Task09_Spleen"
    for name in ("spleen_2", "spleen_3"):
        write_image(task / "imagesTr" / f"{name}.nii.gz", ct_volume())
        write_image(task / "labelsTr" / f"{name}.nii.gz", organs())
    write_image(task / "imagesTs" / "spleen_1.nii.gz", ct_volume())

    cases = cases_from_folder(task, with_labels=True)
    assert {c.case_id: c.label and c.label.relative_to(task).as_posix() for c in cases} == {
        "imagesTr/spleen_2": "labelsTr/spleen_2.nii.gz", "imagesTr/spleen_3": "labelsTr/spleen_3.nii.gz",
        "imagesTs/spleen_1": None}
    assert label_marker((task / "labelsTr" / "spleen_2.nii.gz").relative_to(task)) == "in a label folder (labelsTr/)"
    assert [c.case_id for c in cases_from_paired_folders(task)] == ["spleen_2", "spleen_3"]


def test_ambiguous_or_orphan_labels_are_not_paired_and_are_reported(tmp_path):
    write_image(tmp_path / "a.nii.gz", ct_volume())
    write_image(tmp_path / "a_image.nii.gz", ct_volume())  # two images claim a_label
    write_image(tmp_path / "a_label.nii.gz", organs())
    write_image(tmp_path / "z_seg.nii.gz", organs())  # no image at all
    with pytest.warns(UserWarning) as caught:
        cases = cases_from_folder(tmp_path, with_labels=True)
    message = str(caught[0].message)
    assert "a_label.nii.gz: ambiguous pairing with 2 image(s)" in message
    assert "z_seg.nii.gz: label map with no image of the same name" in message
    assert all(c.label is None for c in cases)
    with pytest.raises(DataSourceError, match=r"2 image\(s\) without a label map"), pytest.warns(UserWarning):
        cases_from_paired_folders(tmp_path)


def test_a_folder_of_only_label_maps_is_an_error_saying_so(tmp_path):
    write_image(tmp_path / "segmentations" / "a.nii.gz", organs())
    with pytest.raises(DataSourceError, match=r"only label maps found .*in a label folder \(segmentations/\)"):
        cases_from_folder(tmp_path)


def test_a_nifti_label_beside_a_dicom_series_folder_pairs_with_it(tmp_path):
    write_dicom_series(tmp_path / "patient1" / "ct", ct_volume(), SERIES)
    write_image(tmp_path / "patient1" / "ct_label.nii.gz", organs())
    (case,) = cases_from_folder(tmp_path, with_labels=True)
    assert case.case_id == "patient1/ct" and case.label.name == "ct_label.nii.gz"


def test_label_map_look():
    assert "only 3 distinct integer values (0, 1, 2)" in label_map_problem(torch.from_numpy(organs()))
    assert "looks like a label map" in label_map_problem(torch.from_numpy(organs()).float())
    assert label_map_problem(torch.from_numpy(ct_volume())) is None  # HU: negative values, hundreds of levels
    mri = torch.from_numpy(np.random.default_rng(0).integers(0, 800, (24, 20, 12)))
    assert label_map_problem(mri) is None
    assert label_map_problem(torch.from_numpy(organs()).float() * 0.37) is None  # not integers


def test_check_data_flags_an_image_that_is_a_label_map_and_skips_named_label_files(tmp_path, capsys):
    from lightning_mim.cli import main

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    write_image(data / "good.nii.gz", ct_volume((40, 40, 24)))
    write_image(data / "good_label.nii.gz", organs((40, 40, 24)))  # skipped by name: never a case
    write_image(data / "unmarked.nii.gz", organs((40, 40, 24)))  # a label map nobody named as such
    code = main(["check-data", "--config", str(repo / "experiments/mae.yaml"),
                 "--config", str(repo / "tests/configs/mae_tiny.yaml"),
                 "--data.init_args.folder", str(data), "--data.init_args.cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 of 2 case(s) ok, 1 bad" in out
    assert f"{data / 'unmarked.nii.gz'}: looks like a label map, not an image: only 3 distinct integer values" in out
    assert "good_label" not in out
