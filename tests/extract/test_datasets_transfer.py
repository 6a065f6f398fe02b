"""The transfer datasets (HAM10000, IDRiD, Messidor-2, NIH ChestX-ray14) from fixture trees in their released layouts,
their split rules and sizes, and the label maps onto their partners (CBIS-DDSM's onto DDSM too).

The `write_*` helpers that build those trees (tiny images) live in tests/layouts.py; the release-size tests build the tables alone, since a builder
lists image paths without opening them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import CacheReader
from common.errors import MedfmError
from extract.datasets import get_dataset, list_datasets
from extract.datasets.label_maps import maps_of, read_label_maps
from extract.datasets.nih_chestxray14 import LABELS as NIH_LABELS
from extract.datasets.splits import SplitWarning
from tests.extract.extractions import invoke
from tests.layouts import (
    HAM_CLASSES,
    NIH_ROWS,
    write_cbis,
    write_chestxray14,
    write_ham10000,
    write_idrid,
    write_idrid_labels,
    write_messidor2,
)

GRADES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")


def owners(source, groups: dict[str, str]) -> list[set[str]]:
    """The groups (lesions, patients, examinations) of each split."""
    return [{groups[i] for i in split.ids} for split in source.splits.values()]


def disjoint(sets: list[set[str]]) -> bool:
    return all(not (a & b) for k, a in enumerate(sets) for b in sets[k + 1:])


# --- HAM10000


def test_ham10000_reads_both_image_parts_and_keeps_each_lesion_in_one_stratified_split(tmp_path: Path) -> None:
    table = write_ham10000(tmp_path)
    source = get_dataset("ham10000", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 75, "val": 10, "test": 13}
    assert disjoint(owners(source, dict(zip(table["image_id"], table["lesion_id"], strict=True))))
    dx = dict(zip(table["image_id"], table["dx"], strict=True))
    for split in source.splits.values():
        assert [HAM_CLASSES[c] for c in split.labels] == [dx[i] for i in split.ids]
        assert set(split.labels.tolist()) == set(range(7))  # stratified: every class in every split
        assert all(p.is_file() for p in split.images)
    assert {p.parent.name for p in source.splits["train"].images} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert source.splits["val"].metadata.keys() == {"dx_type", "age", "sex", "localization"}
    assert source.task.class_names == HAM_CLASSES and source.task.primary_metric == "macro_recall" and not source.grayscale
    assert source.manifest() == get_dataset("ham10000", tmp_path).manifest()
    assert source.manifest() != get_dataset("ham10000", tmp_path, split_seed=1).manifest()


def ham10000_release_table() -> pd.DataFrame:
    """The release's 10,015 rows (dx counts as published), 2,545 lesions photographed twice: 7,470 lesions."""
    counts = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
    dx = [d for d, n in counts.items() for _ in range(n)]
    lesions, pairs, single = [], 2545, False
    for k, d in enumerate(dx):  # an image joins the previous one's lesion (same dx, one image so far) while pairs remain
        if pairs and single and dx[k - 1] == d:
            lesions.append(lesions[-1])
            pairs, single = pairs - 1, False
        else:
            lesions.append(f"HAM_{k:07d}")
            single = True
    return pd.DataFrame({"lesion_id": lesions, "image_id": [f"ISIC_{k:07d}" for k in range(len(dx))], "dx": dx})


def test_ham10000_release_of_10015_images_and_7470_lesions_splits_about_80_10_10(tmp_path: Path) -> None:
    table = ham10000_release_table()
    assert table["lesion_id"].nunique() == 7470
    table.to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    (tmp_path / "HAM10000_images_part_1").mkdir()
    source = get_dataset("ham10000", tmp_path)
    assert [len(s) for s in source.splits.values()] == [8003, 1003, 1009]
    assert disjoint(owners(source, dict(zip(table["image_id"], table["lesion_id"], strict=True))))
    release = np.bincount(table["dx"].map(HAM_CLASSES.index), minlength=7) / len(table)
    for split in source.splits.values():  # each class's share within a point of the release's
        assert np.abs(np.bincount(split.labels, minlength=7) / len(split) - release).max() < 0.01


def test_ham10000_refuses_an_unknown_diagnosis_and_a_missing_image_folder(tmp_path: Path) -> None:
    table = write_ham10000(tmp_path / "ham", lesions_per_class=2)
    table.loc[3, "dx"] = "scc"
    table.to_csv(tmp_path / "ham" / "HAM10000_metadata.csv", index=False)
    with pytest.raises(MedfmError, match="dx must be one of akiec, .*; found scc"):
        get_dataset("ham10000", tmp_path / "ham")
    (tmp_path / "bare").mkdir()
    table.iloc[:1].to_csv(tmp_path / "bare" / "HAM10000_metadata.csv", index=False)
    with pytest.raises(MedfmError, match="has no image folder \\(HAM10000_images_part_1, HAM10000_images_part_2\\)"):
        get_dataset("ham10000", tmp_path / "bare")


# --- IDRiD


def test_idrid_keeps_the_official_test_set_and_carves_a_stratified_val_from_train(tmp_path: Path) -> None:
    part = write_idrid(tmp_path)
    source = get_dataset("idrid", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 45, "val": 5, "test": 10}
    assert sorted(source.splits["val"].labels.tolist()) == [0, 1, 2, 3, 4]  # one of each grade
    assert source.splits["test"].ids == [f"test/IDRiD_{k:03d}" for k in range(1, 11)]
    assert source.splits["test"].labels.tolist() == [0, 1, 2, 3, 4] * 2
    assert source.splits["test"].images[0] == part / "1. Original Images/b. Testing Set/IDRiD_001.jpg"
    assert all(p.is_file() for s in source.splits.values() for p in s.images)
    assert all(i.startswith("train/") for i in source.splits["train"].ids + source.splits["val"].ids)
    assert source.splits["test"].metadata["Risk of macular edema"][:3] == ["0", "1", "2"]
    assert source.task.class_names == GRADES and source.task.primary_metric == "quadratic_kappa"
    assert get_dataset("idrid", part).manifest() == source.manifest()  # --root: the part itself or its parent


def test_idrid_release_of_413_and_103_images_splits_371_42_103(tmp_path: Path) -> None:
    train = [g for g, n in enumerate((134, 20, 136, 74, 49)) for _ in range(n)]
    test = [g for g, n in enumerate((34, 5, 32, 19, 13)) for _ in range(n)]
    write_idrid_labels(tmp_path / "B. Disease Grading" / "B. Disease Grading", {"train": train, "test": test})  # zips nest it twice
    source = get_dataset("idrid", tmp_path)
    assert [len(s) for s in source.splits.values()] == [371, 42, 103]
    assert np.bincount(source.splits["val"].labels).tolist() == [14, 2, 13, 8, 5]


def test_idrid_refuses_a_grade_outside_0_to_4_and_a_missing_folder(tmp_path: Path) -> None:
    write_idrid_labels(tmp_path, {"train": [0, 7, 1], "test": [0]})
    with pytest.raises(MedfmError, match="Retinopathy grade must be a grade 0-4; rows IDRiD_002 are not"):
        get_dataset("idrid", tmp_path)
    write_idrid_labels(tmp_path, {"train": [0, 4, 1], "test": [0]})
    with pytest.raises(MedfmError, match="10 stratified folds needs at least 10 groups \\(lesions, patients or images\\); found 3"):
        get_dataset("idrid", tmp_path)
    with pytest.raises(MedfmError, match="holds no '2. Groundtruths' folder; dataset 'idrid' expects"):
        get_dataset("idrid", tmp_path / "2. Groundtruths")


# --- Messidor-2


def test_messidor2_leaves_ungradable_out_and_keeps_both_eyes_of_an_examination_together(tmp_path: Path) -> None:
    table = write_messidor2(tmp_path)
    with pytest.warns(SplitWarning, match="30 groups are too few to stratify 10 folds by label .*made at random"):
        source = get_dataset("messidor2", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 47, "val": 6, "test": 6}
    ids = [i for s in source.splits.values() for i in s.ids]
    assert len(ids) == 59 and "IM002386.jpg" not in ids  # the ungradable right eye of the first examination
    assert disjoint(owners(source, dict(zip(table["image_id"], table["exam"], strict=True))))
    grade = dict(zip(table["image_id"], table["adjudicated_dr_grade"], strict=True))
    for split in source.splits.values():
        assert split.labels.tolist() == [int(grade[i]) for i in split.ids]
        assert all(p.is_file() for p in split.images)  # IM*.jpg in the CSV found as IM*.JPG on disk
    assert source.task.class_names == GRADES and source.task.primary_metric == "quadratic_kappa"
    assert source.splits["train"].metadata.keys() == {"adjudicated_dme"}


def test_messidor2_release_of_1748_images_in_874_examinations_splits_by_examination(tmp_path: Path) -> None:
    grades = [g for g, n in enumerate((1017, 270, 347, 75, 35)) for _ in range(n)] + [None] * 4
    names = [f"IM{k:06d}.JPG" for k in range(1748)]
    pd.DataFrame({"image_id": names, "adjudicated_dr_grade": grades, "adjudicated_dme": 0,
                  "adjudicated_gradable": [int(g is not None) for g in grades]}).to_csv(tmp_path / "messidor_data.csv", index=False)
    (tmp_path / "messidor-2.csv").write_text("\n".join(f"{names[k]};{names[k + 1]}" for k in range(0, 1748, 2)))
    (tmp_path / "IMAGES").mkdir()
    source = get_dataset("messidor2", tmp_path)
    assert [len(s) for s in source.splits.values()] == [1396, 174, 174]
    assert disjoint(owners(source, {n: str(k // 2) for k, n in enumerate(names)}))


# --- NIH ChestX-ray14


def test_chestxray14_uses_the_official_lists_and_keeps_patients_out_of_val(tmp_path: Path) -> None:
    write_chestxray14(tmp_path)
    source = get_dataset("chestxray14", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 11, "val": 1, "test": 4}
    assert source.splits["test"].ids == [r[0] for r in NIH_ROWS if r[3] == "test"]
    patient = {r[0]: str(r[2]) for r in NIH_ROWS}
    assert disjoint(owners(source, patient))
    findings = {r[0]: r[1] for r in NIH_ROWS}
    for split in source.splits.values():
        assert split.labels.dtype == np.float32 and split.labels.shape == (len(split), 14)
        for i, row in zip(split.ids, split.labels, strict=True):
            assert {NIH_LABELS[j] for j in np.flatnonzero(row)} == set(findings[i].split("|")) - {"No Finding"}
        assert all(p.is_file() for p in split.images)
    assert source.splits["test"].images[3].parent.parent.name == "images_002"
    assert source.splits["test"].metadata["Patient Gender"] == ["F", "M", "F", "F"]
    assert source.grayscale and source.task.kind == "multilabel" and source.task.primary_metric == "mean_roc_auc"


def test_chestxray14_names_an_unknown_finding_and_an_image_missing_from_the_table(tmp_path: Path) -> None:
    table = write_chestxray14(tmp_path)
    table.loc[4, "Finding Labels"] = "Effusion|Cardiomegally"
    table.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(MedfmError, match="row 6 names finding 'Cardiomegally', not one of No Finding, Atelectasis"):
        get_dataset("chestxray14", tmp_path)
    table.drop(index=4).to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(MedfmError, match="1 image\\(s\\) of the split lists are not in Data_Entry_2017.csv, e.g. 00000003_001.png"):
        get_dataset("chestxray14", tmp_path)
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(MedfmError, match="test_list.txt does not exist; dataset 'chestxray14' expects"):
        get_dataset("chestxray14", tmp_path)


# --- label maps


MAPPED = {("ham10000", "isic2019"): 7, ("idrid", "aptos2019"): 5, ("messidor2", "aptos2019"): 5,
          ("chestxray14", "chexpert"): 7, ("cbis-ddsm", "ddsm"): 2}


def test_every_packaged_label_map_names_each_own_class_and_only_partner_classes() -> None:
    maps = read_label_maps()
    assert {(m.dataset, m.partner) for m in maps} == set(MAPPED)
    for m in maps:
        assert m.path.name == f"{m.dataset}-{m.partner}.json" and m.note
        [checked] = maps_of(m.dataset)  # checked against both datasets' registered classes
        assert len(checked.mapping) - len(checked.unmapped()) == MAPPED[(m.dataset, m.partner)]
    registered = {e.name for e in list_datasets() if e.classes}
    assert {d for d, _ in MAPPED} | {p for _, p in MAPPED} <= registered


def test_label_maps_say_what_maps_where_and_what_is_left_out() -> None:
    [ham] = maps_of("ham10000")
    assert ham.mapping["akiec"] == "AK" and ham.mapping["nv"] == "NV" and ham.unsourced() == ["SCC"]
    [nih] = maps_of("chestxray14")
    assert nih.mapping["Effusion"] == "Pleural Effusion" and nih.mapping["Edema"] == "Edema"
    assert nih.unmapped() == ["Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
    assert "No Finding" in nih.unsourced() and "Lung Lesion" in nih.unsourced()
    [cbis] = maps_of("cbis-ddsm")
    assert set(cbis.mapping.values()) == {"abnormal"} and cbis.unsourced() == ["normal"]
    for fundus in ("idrid", "messidor2"):
        [grades] = maps_of(fundus)
        assert grades.mapping == {g: g for g in GRADES}


@pytest.mark.parametrize(("content", "message"), [
    ({"map": {"akiec": "AK"}}, "lacks own class\\(es\\) bcc, bkl, df, mel, nv, vasc \\(map each to a class of isic2019 or to null\\)"),
    ({"map": {**{c: None for c in HAM_CLASSES}, "scc": None}}, "names class\\(es\\) scc that ham10000 does not have"),
    ({"map": {**{c: None for c in HAM_CLASSES}, "akiec": "AKIEC"}}, "maps onto AKIEC, not among isic2019's classes \\(MEL, NV"),
    ({"partner": "isic2018"}, "partner 'isic2018' is not a registered dataset"),
    ({"map": ["akiec"]}, '"dataset" and "partner" must be names and "map" must map class names to a partner class'),
])
def test_a_broken_label_map_is_one_line_naming_the_file_and_the_problem(tmp_path: Path, content: dict, message: str) -> None:
    data = {"dataset": "ham10000", "partner": "isic2019", "map": {c: None for c in HAM_CLASSES}, "note": "", **content}
    (tmp_path / "ham10000-isic2019.json").write_text(json.dumps(data))
    with pytest.raises(MedfmError, match=f"label map {tmp_path / 'ham10000-isic2019.json'}: {message}"):
        maps_of("ham10000", folder=tmp_path)


def test_two_maps_for_one_pair_or_a_file_that_is_not_json_are_refused(tmp_path: Path) -> None:
    data = {"dataset": "idrid", "partner": "aptos2019", "map": {g: g for g in GRADES}, "note": ""}
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(MedfmError, match="more than one label map for idrid -> aptos2019; keep one file per pair"):
        maps_of("idrid", folder=tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.json").write_text("{not json")
    with pytest.raises(MedfmError, match="x.json cannot be read \\(JSONDecodeError"):
        maps_of("idrid", folder=tmp_path / "bad")


@pytest.mark.filterwarnings("ignore::extract.datasets.splits.SplitWarning")  # 2 lesions a class: random folds
def test_built_datasets_carry_their_label_maps_and_partners_carry_none(tmp_path: Path) -> None:
    write_ham10000(tmp_path / "ham", lesions_per_class=2)
    assert get_dataset("ham10000", tmp_path / "ham").label_maps["isic2019"]["akiec"] == "AK"
    write_cbis(tmp_path / "cbis", n_train_patients=4)
    assert get_dataset("cbis-ddsm", tmp_path / "cbis", abnormality="mass").label_maps == {
        "ddsm": {"benign": "abnormal", "malignant": "abnormal"}}
    write_chestxray14(tmp_path / "nih")
    assert get_dataset("chestxray14", tmp_path / "nih").label_maps["chexpert"]["Hernia"] is None
    assert get_dataset("demo").label_maps == {}


def test_extract_datasets_lists_the_transfer_datasets_and_each_label_map(monkeypatch) -> None:
    code, out, err = invoke(["datasets"], monkeypatch)
    assert code == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for name in ("ham10000", "idrid", "messidor2", "chestxray14"):
        assert any(line.startswith(f"{name} ") for line in lines), name
    assert "map ham10000 -> isic2019: 7/7 classes mapped; isic2019 classes without a source: SCC" in lines
    assert "map cbis-ddsm -> ddsm: 2/2 classes mapped; ddsm classes without a source: normal" in lines
    assert any(line.startswith("map chestxray14 -> chexpert: 7/14 classes mapped; unmapped: Infiltration, Mass") for line in lines)


@pytest.mark.filterwarnings("ignore::extract.datasets.splits.SplitWarning")  # 2 lesions a class: random folds
def test_extract_run_on_a_ham10000_tree_caches_its_split_and_label_map(tmp_path: Path, monkeypatch) -> None:
    write_ham10000(tmp_path / "ham", lesions_per_class=2)
    args = ["run", "--backbone", "tiny-deit", "--weights", "random", "--dataset", "ham10000", "--root", str(tmp_path / "ham"),
            "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "out")]
    code, _, err = invoke(args, monkeypatch)
    assert code == 0, err
    [path] = (tmp_path / "out").rglob("ham10000-*.h5")
    source = get_dataset("ham10000", tmp_path / "ham")
    with CacheReader(path) as reader:
        assert {s: reader.ids(s).tolist() for s in reader.splits} == source.manifest()
        assert reader.labels("test").tolist() == source.splits["test"].labels.tolist()
        assert reader.meta.label_maps == {"isic2019": source.label_maps["isic2019"]}
        assert reader.task.class_names == HAM_CLASSES and reader.meta.dataset.name == "ham10000"
