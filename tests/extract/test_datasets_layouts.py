"""Each dataset read from a small fixture tree in its released layout: rows, labels, splits, tasks, errors.

The `write_*` helpers that build those trees live in tests/layouts.py, shared with the extraction tests.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from common.errors import MedfmError
from extract.datasets import get_dataset
from extract.datasets.chexpert import LABELS
from extract.datasets.ddsm import read_dicom
from extract.datasets.splits import SplitWarning
from tests.layouts import (
    chexpert_rows,
    image,
    write_aptos,
    write_cbis,
    write_chexpert,
    write_ddsm,
    write_dicom,
    write_isic,
    write_medmnist,
)

# --- APTOS2019, ISIC2019


def test_aptos_reads_kaggle_layout_with_study_split_and_grades(tmp_path: Path) -> None:
    ids = write_aptos(tmp_path)
    source = get_dataset("aptos2019", tmp_path)
    order = list(range(20))
    random.Random(42).shuffle(order)
    assert source.manifest() == {"train": [ids[i] for i in order[6:]], "val": [ids[i] for i in order[:3]],
                                 "test": [ids[i] for i in order[3:6]]}
    val = source.splits["val"]
    assert val.labels.tolist() == [order[k] % 5 for k in range(3)]
    assert val.images[0] == tmp_path / "train_images" / f"{ids[order[0]]}.png"
    assert source.task.kind == "multiclass" and source.task.primary_metric == "quadratic_kappa"
    assert len(source.task.class_names) == 5 and not source.grayscale


def test_aptos_rejects_a_grade_outside_0_to_4(tmp_path: Path) -> None:
    pd.DataFrame({"id_code": ["a", "b"], "diagnosis": [1, 7]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(MedfmError, match="diagnosis must be a grade 0-4; rows b"):
        get_dataset("aptos2019", tmp_path)


def test_isic_reads_one_hot_ground_truth_and_release_or_kaggle_image_folder(tmp_path: Path) -> None:
    ids = write_isic(tmp_path, "ISIC_2019_Training_Input/ISIC_2019_Training_Input")
    source = get_dataset("isic2019", tmp_path)
    assert sum(len(s) for s in source.splits.values()) == 16 and len(source.splits["val"]) == 1
    for split in source.splits.values():
        assert split.labels.tolist() == [ids.index(i) % 8 for i in split.ids]
        assert split.images[0].is_file()
    assert source.task.class_names[:3] == ("MEL", "NV", "BCC") and source.task.primary_metric == "macro_recall"


def test_isic_refuses_rows_without_a_single_class(tmp_path: Path) -> None:
    write_isic(tmp_path)
    table = pd.read_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv")
    table.loc[3, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]] = 0.0
    table.loc[3, "UNK"] = 1.0
    table.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(MedfmError, match="exactly one positive .* ISIC_0000003"):
        get_dataset("isic2019", tmp_path)


# --- CheXpert


def test_chexpert_reads_release_paths_from_the_folder_or_its_parent(tmp_path: Path) -> None:
    root = write_chexpert(tmp_path)
    source = get_dataset("chexpert", root)
    first = source.splits["val"]
    assert first.ids[0] == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"  # sorted by Path
    assert first.images[0] == root / "train/patient00001/study1/view1_frontal.jpg" and first.images[0].is_file()
    assert get_dataset("chexpert", tmp_path).manifest() == source.manifest()
    assert source.grayscale and source.task.kind == "multilabel" and source.task.primary_metric == "mean_roc_auc"
    assert source.task.class_names == LABELS and first.labels.shape == (len(first), 14)
    # cut = int(0.2 * 40) + 15 = 23; rows are cut by index label: label 12 (patient00004/study2) sorts to position 13
    assert (len(source.splits["train"]), len(first), len(source.splits["test"])) == (17, 14, 11)
    assert first.ids[-1] == source.splits["test"].ids[0] == "CheXpert-v1.0-small/train/patient00004/study2/view1_frontal.jpg"


def chexpert_policy_labels(tmp_path: Path, policy: str) -> np.ndarray:
    """Rows: [1, -1, blank, 0, ...], [-1 only], [blank only], [0 and blank] and 36 ordinary rows."""
    labels = np.zeros((40, 14))
    labels[4:, 2] = 1
    labels[0, 1:5] = [1, -1, np.nan, 0]
    labels[0, 5:] = np.nan
    labels[1, :] = np.nan
    labels[1, 3] = -1
    labels[2, :] = np.nan
    labels[3, ::2] = np.nan
    root = write_chexpert(tmp_path, labels)
    source = get_dataset("chexpert", root, policy=policy)
    rows = {i: (s, k) for s in source.splits.values() for k, i in enumerate(s.ids)}
    return np.stack([rows[p][0].labels[rows[p][1]] for p in chexpert_rows()[:4]])


def test_chexpert_u_zeros_maps_uncertain_and_blank_to_zero_and_fills_no_finding(tmp_path: Path) -> None:
    got = chexpert_policy_labels(tmp_path, "zeros")
    assert got[0, :5].tolist() == [0, 1, 0, 0, 0] and not got[0, 5:].any()
    assert got[1].tolist() == [1] + [0] * 13  # only uncertain -> all zero -> No Finding
    assert got[2].tolist() == [1] + [0] * 13 and got[3].tolist() == [1] + [0] * 13


def test_chexpert_u_ones_maps_uncertain_to_one(tmp_path: Path) -> None:
    got = chexpert_policy_labels(tmp_path, "ones")
    assert got[0, :5].tolist() == [0, 1, 1, 0, 0]
    assert got[1].tolist() == [0, 0, 0, 1] + [0] * 10
    assert got[2, 0] == 1


def test_chexpert_ignore_marks_uncertain_as_nan_for_masking(tmp_path: Path) -> None:
    got = chexpert_policy_labels(tmp_path, "ignore")
    assert got.dtype == np.float32
    assert got[0, 1] == 1 and np.isnan(got[0, 2]) and got[0, 3] == 0 and got[0, 0] == 0
    assert np.isnan(got[1, 3]) and got[1, 0] == 0  # an unknown finding is not "No Finding"
    assert np.isnan(got).sum() == 2 and got[2, 0] == 1


def test_chexpert_patient_split_keeps_patients_apart(tmp_path: Path) -> None:
    root = write_chexpert(tmp_path, n_patients=20)
    source = get_dataset("chexpert", root, split="patient", split_seed=0)
    owners = [{i.split("/")[2] for i in s.ids} for s in source.splits.values()]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert [len(o) for o in owners] == [16, 2, 2] and source.options["split"] == "patient"


def test_chexpert_names_missing_label_columns_and_bad_options(tmp_path: Path) -> None:
    root = write_chexpert(tmp_path)
    table = pd.read_csv(root / "train.csv").drop(columns=["Edema", "Fracture"])
    table.to_csv(root / "train.csv", index=False)
    with pytest.raises(MedfmError, match="lacks column\\(s\\) Edema, Fracture"):
        get_dataset("chexpert", root)
    with pytest.raises(MedfmError, match="policy=maybe is not one of zeros, ones, ignore"):
        get_dataset("chexpert", root, policy="maybe")


# --- DDSM, CBIS-DDSM


def test_ddsm_uses_fixed_lists_and_merges_benign_with_cancer(tmp_path: Path) -> None:
    lists = write_ddsm(tmp_path)
    source = get_dataset("ddsm", tmp_path)
    assert source.manifest() == lists
    assert source.splits["train"].labels.tolist() == [0, 1, 1, 0, 1, 1]
    assert source.task.kind == "binary" and source.task.primary_metric == "roc_auc" and source.grayscale
    three = get_dataset("ddsm", tmp_path, classes="3")
    assert three.splits["train"].labels.tolist() == [0, 1, 2, 0, 2, 1]
    assert three.task.class_names == ("normal", "benign", "cancer")


def test_ddsm_names_a_missing_list_and_an_unlabelled_file(tmp_path: Path) -> None:
    write_ddsm(tmp_path)
    (tmp_path / "ddsm_raw_image_lists" / "val.txt").write_text("mystery_1.png\n")
    with pytest.raises(MedfmError, match="'mystery_1.png' does not start with normal_, benign_ or cancer_"):
        get_dataset("ddsm", tmp_path)
    (tmp_path / "ddsm_raw_image_lists" / "test.txt").unlink()
    (tmp_path / "ddsm_raw_image_lists" / "val.txt").write_text("normal_07.png\n")
    with pytest.raises(MedfmError, match="test.txt does not exist"):
        get_dataset("ddsm", tmp_path)


def test_cbis_labels_images_malignant_if_any_abnormality_is_and_finds_tcia_dicoms(tmp_path: Path) -> None:
    labels = write_cbis(tmp_path)
    with pytest.raises(MedfmError, match="calc_case_description_train_set.csv does not exist.*abnormality=mass"):
        get_dataset("cbis-ddsm", tmp_path)
    source = get_dataset("cbis-ddsm", tmp_path, abnormality="mass")
    assert source.splits["test"].ids == [f"Mass-Test_P_{p:05d}_LEFT_CC" for p in (500, 501, 502)]
    assert len(source.splits["train"]) == 9 and len(source.splits["val"]) == 1
    for split in source.splits.values():
        assert split.labels.tolist() == [labels[i] for i in split.ids]
        assert all(p.is_file() and p.name == "1-1.dcm" for p in split.images)
    assert labels["Mass-Training_P_00000_LEFT_CC"] == 1 and labels["Mass-Training_P_00001_LEFT_CC"] == 0
    assert source.task.class_names == ("benign", "malignant") and source.grayscale
    img = source.load_image(source.splits["test"].images[0])
    assert img.mode == "L" and img.size == (8, 8) and np.asarray(img).min() == 0 and np.asarray(img).max() == 255


def test_read_dicom_inverts_monochrome1(tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    plain = np.asarray(read_dicom(write_dicom(tmp_path / "a.dcm", pixels)))
    inverted = np.asarray(read_dicom(write_dicom(tmp_path / "b.dcm", pixels, "MONOCHROME1")))
    assert plain[0, 0] == 0 and plain[-1, -1] == 255 and np.array_equal(inverted, 255 - plain)
    assert pydicom.dcmread(tmp_path / "a.dcm").Rows == 8


# --- MedMNIST


def test_medmnist_uses_the_files_splits_and_infers_the_task(tmp_path: Path) -> None:
    source = get_dataset("medmnist", write_medmnist(tmp_path / "organamnist.npz"))
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 12, "val": 4, "test": 5}
    assert source.task.kind == "multiclass" and source.task.class_names == ("0", "1", "2") and source.grayscale
    assert source.splits["val"].labels.tolist() == [0, 1, 2, 0] and source.splits["test"].ids[0] == "test-000000"
    assert source.load_image(source.splits["train"].images[3]).size == (8, 8)
    multilabel = get_dataset("medmnist", write_medmnist(tmp_path / "chest" / "chestmnist.npz", label_width=4, rgb=True),
                             classes="a,b,c,d")
    assert multilabel.task.kind == "multilabel" and multilabel.task.primary_metric == "mean_roc_auc"
    assert multilabel.splits["train"].labels.shape == (12, 4) and not multilabel.grayscale
    assert get_dataset("medmnist", tmp_path / "chest").task.class_names == ("0", "1", "2", "3")


def test_medmnist_names_missing_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(MedfmError, match="lacks array\\(s\\) val_images, val_labels, test_images, test_labels"):
        get_dataset("medmnist", tmp_path / "x.npz")


# --- your own data


def test_imagefolder_takes_presplit_folders_as_the_split(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("benign", "malignant"):
            for i in range(n):
                image(tmp_path / split / cls / f"{i}.png")
    source = get_dataset("imagefolder", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 8, "val": 4, "test": 4}
    assert source.splits["val"].ids == ["val/benign/0.png", "val/benign/1.png", "val/malignant/0.png", "val/malignant/1.png"]
    assert source.splits["val"].labels.tolist() == [0, 0, 1, 1] and source.task.kind == "binary"


def test_imagefolder_flat_layout_is_stratified_and_seeded(tmp_path: Path) -> None:
    for cls in ("a", "b", "c"):
        for i in range(20):
            image(tmp_path / cls / f"{i}.jpg")
    source = get_dataset("imagefolder", tmp_path, split_seed=7)
    assert [np.bincount(s.labels).tolist() for s in source.splits.values()] == [[14, 14, 14], [3, 3, 3], [3, 3, 3]]
    assert source.manifest() == get_dataset("imagefolder", tmp_path, split_seed=7).manifest()
    assert source.manifest() != get_dataset("imagefolder", tmp_path, split_seed=8).manifest()


def write_csv_dataset(root: Path, n: int = 40) -> pd.DataFrame:
    table = pd.DataFrame({"file": [f"img/{i}.png" for i in range(n)], "finding": ["yes" if i % 2 else "no" for i in range(n)],
                          "patient": [f"P{i // 2}" for i in range(n)], "fold": ["train"] * (n - 6) + ["val"] * 3 + ["test"] * 3})
    table.to_csv(root / "labels.csv", index=False)
    for path in table["file"]:
        image(root / path)
    return table


def test_csv_groups_patients_or_follows_a_split_column(tmp_path: Path) -> None:
    table = write_csv_dataset(tmp_path)
    grouped = get_dataset("csv", tmp_path, path_column="file", label_column="finding", group_column="patient", split_seed=1)
    patient = dict(zip(table["file"], table["patient"], strict=True))
    owners = [{patient[i] for i in s.ids} for s in grouped.splits.values()]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert grouped.task.class_names == ("no", "yes") and grouped.task.primary_metric == "roc_auc"
    fixed = get_dataset("csv", tmp_path / "labels.csv", path_column="file", label_column="finding", split_column="fold")
    assert fixed.splits["test"].ids == ["img/37.png", "img/38.png", "img/39.png"]
    assert fixed.splits["test"].labels.tolist() == [1, 0, 1] and fixed.splits["test"].images[0] == tmp_path / "img/37.png"


def test_csv_names_missing_columns_blank_cells_and_unknown_options(tmp_path: Path) -> None:
    write_csv_dataset(tmp_path)
    with pytest.raises(MedfmError, match="lacks column\\(s\\) path, label; it has file, finding, patient, fold"):
        get_dataset("csv", tmp_path)
    table = pd.read_csv(tmp_path / "labels.csv")
    table.loc[5, "finding"] = None
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(MedfmError, match="line\\(s\\) 7 have an empty file / finding value"):
        get_dataset("csv", tmp_path, path_column="file", label_column="finding")
    with pytest.raises(MedfmError, match="dataset 'csv' has no option\\(s\\) lable_column; it takes csv, path_column"):
        get_dataset("csv", tmp_path, lable_column="finding")


def test_missing_root_or_layout_file_is_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="needs --root PATH"):
        get_dataset("aptos2019", None)
    with pytest.raises(MedfmError, match="--root .*nope does not exist; dataset 'isic2019' expects"):
        get_dataset("isic2019", tmp_path / "nope")
    with pytest.raises(MedfmError, match="train.csv does not exist; dataset 'aptos2019' expects train.csv"):
        get_dataset("aptos2019", tmp_path)
    with pytest.raises(MedfmError, match="dataset 'ddsm' has no option\\(s\\) split_seed; it takes classes"):
        get_dataset("ddsm", tmp_path, split_seed=3)


def test_imagefolder_refuses_an_empty_class_folder_and_ignores_hidden_ones(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(6):
            image(tmp_path / "three" / cls / f"{i}.png")
    (tmp_path / "three" / "c").mkdir()  # a third class without images: a class no model can learn or be scored on
    with pytest.raises(MedfmError, match="class folder\\(s\\) c/ under .* hold no images"):
        get_dataset("imagefolder", tmp_path / "three")
    image(tmp_path / "one" / "a" / "0.png")
    (tmp_path / "one" / "b").mkdir()  # one class with images: not a "binary" task
    with pytest.raises(MedfmError, match="class folder\\(s\\) b/"):
        get_dataset("imagefolder", tmp_path / "one")
    (tmp_path / "three" / "c").rmdir()
    (tmp_path / "three" / ".ipynb_checkpoints").mkdir()
    assert get_dataset("imagefolder", tmp_path / "three").task.class_names == ("a", "b")


def test_imagefolder_ids_show_undecodable_file_name_bytes_as_escapes(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(6):
            image(tmp_path / cls / f"{i}.png")
    image(tmp_path / "a" / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name: not UTF-8, which the cache stores
    source = get_dataset("imagefolder", tmp_path)
    ids = [i for split in source.splits.values() for i in split.ids]
    assert "a/caf\\xe9.png" in ids and all(i.encode("utf-8") for i in ids)


def test_imagefolder_of_five_images_per_class_splits_unstratified_with_a_warning(tmp_path: Path) -> None:
    for cls in ("neg", "pos"):
        for i in range(5):
            image(tmp_path / cls / f"{i}.png")
    with pytest.warns(SplitWarning, match="10 images are too few to stratify .* val and test are split at random"):
        source = get_dataset("imagefolder", tmp_path)
    assert sorted(i for s in source.splits.values() for i in s.ids) == sorted(f"{c}/{i}.png" for c in ("neg", "pos") for i in range(5))
    assert all(len(s) for s in source.splits.values())


def write_csv_rows(root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "labels.csv", index=False)
    for path, _ in rows:
        if not Path(path).is_absolute() and ".." not in path:
            image(root / path)
    return root


def test_csv_refuses_labels_that_differ_only_in_case_or_spaces_and_a_single_label(tmp_path: Path) -> None:
    rows = [(f"img/{i}.png", ("pos", "neg", "Pos")[i % 3]) for i in range(30)]
    with pytest.raises(MedfmError, match="differ only in case or spaces \\('Pos' and 'pos'\\)"):
        get_dataset("csv", write_csv_rows(tmp_path / "case", rows))
    rows = [(f"img/{i}.png", ("pos", "pos ")[i % 2]) for i in range(30)]
    with pytest.raises(MedfmError, match="\\('pos' and 'pos '\\)"):
        get_dataset("csv", write_csv_rows(tmp_path / "space", rows))
    with pytest.raises(MedfmError, match="holds only the label 'pos'; a classifier needs at least two classes"):
        get_dataset("csv", write_csv_rows(tmp_path / "one", [(f"img/{i}.png", "pos") for i in range(30)]))


def test_csv_refuses_paths_outside_its_folder_unless_allowed(tmp_path: Path) -> None:
    outside = image(tmp_path / "elsewhere" / "secret.png")
    rows = [(f"img/{i}.png", ("neg", "pos")[i % 2]) for i in range(20)]
    root = write_csv_rows(tmp_path / "data", [*rows, ("../elsewhere/secret.png", "pos")])
    with pytest.raises(MedfmError, match="line 22 names ../elsewhere/secret.png, outside .*data .*allow_outside_root=true"):
        get_dataset("csv", root)
    root = write_csv_rows(tmp_path / "abs", [*rows, (str(outside), "pos")])
    with pytest.raises(MedfmError, match="names .*secret.png, outside"):
        get_dataset("csv", root)
    allowed = get_dataset("csv", root, allow_outside_root="true")
    assert outside in [p for s in allowed.splits.values() for p in s.images]
    inside = write_csv_rows(tmp_path / "inside", [*rows[:-1], ("img/../img/19.png", "pos")])
    assert len([i for s in get_dataset("csv", inside).splits.values() for i in s.ids]) == 20  # `..` that stays inside is fine
    with pytest.raises(MedfmError, match="--opt allow_outside_root=maybe must be true or false"):
        get_dataset("csv", root, allow_outside_root="maybe")
