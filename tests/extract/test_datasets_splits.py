"""Split rules at the real dataset sizes: the study's exact ids, patient-grouped splits, saved manifests."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import MedfmError
from extract.datasets import get_dataset
from extract.datasets.chexpert import study_split
from extract.datasets.splits import SplitWarning, grouped_split, read_manifest, stratified_split, study_holdout


def study_procedure(n: int, holdout: float) -> dict[str, list[int]]:
    """The study's split as docs/protocol.md §1 words it: shuffle range(N) with Random(42), first int(N*h) held out, halved."""
    order = list(range(n))
    random.Random(42).shuffle(order)
    held = order[: int(n * holdout)]
    return {"train": order[int(n * holdout):], "val": held[: len(held) // 2], "test": held[len(held) // 2:]}


@pytest.mark.parametrize(("n", "holdout", "sizes"), [(3662, 0.3, (2564, 549, 549)), (25331, 0.2, (20265, 2533, 2533))])
def test_study_holdout_gives_the_studys_sizes_and_ids(n: int, holdout: float, sizes: tuple[int, int, int]) -> None:
    parts = study_holdout(n, holdout)
    assert tuple(len(parts[s]) for s in ("train", "val", "test")) == sizes
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(n))
    want = study_procedure(n, holdout)
    assert all(parts[s].tolist() == want[s] for s in want)


def test_study_holdout_is_pinned_and_drawn_from_its_seed() -> None:
    """Pinned ids guard against any change of the shuffle (a Python upgrade, a refactor); the seed decides the draw."""
    assert study_holdout(3662, 0.3)["val"].tolist() == study_holdout(3662, 0.3, seed=42)["val"].tolist()  # the study's seed
    assert study_holdout(3662, 0.3, seed=43)["val"].tolist() != study_holdout(3662, 0.3)["val"].tolist()
    assert study_holdout(3662, 0.3)["val"][:5].tolist() == [2791, 2171, 1708, 2071, 1406]
    assert study_holdout(3662, 0.3)["test"][:3].tolist() == [1490, 1713, 2516]
    assert study_holdout(25331, 0.2)["val"][:5].tolist() == [19993, 22352, 7, 6495, 15314]


def test_aptos_train_csv_of_3662_rows_splits_2564_549_549_by_the_study_procedure(tmp_path: Path) -> None:
    ids = [f"{i:012x}" for i in range(3662)]
    pd.DataFrame({"id_code": ids, "diagnosis": [i % 5 for i in range(3662)]}).to_csv(tmp_path / "train.csv", index=False)
    source = get_dataset("aptos2019", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 2564, "val": 549, "test": 549}
    want = study_procedure(3662, 0.3)
    assert source.splits["val"].ids == [ids[i] for i in want["val"]]
    assert source.manifest() == get_dataset("aptos2019", tmp_path).manifest()


def test_isic_ground_truth_of_25331_rows_splits_20265_2533_2533(tmp_path: Path) -> None:
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    onehot = np.zeros((25331, 9))
    onehot[np.arange(25331), np.arange(25331) % 8] = 1.0
    table = pd.DataFrame(onehot, columns=classes)
    table.insert(0, "image", [f"ISIC_{i:07d}" for i in range(25331)])
    table.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    (tmp_path / "ISIC_2019_Training_Input").mkdir()
    source = get_dataset("isic2019", tmp_path)
    assert {s: len(v) for s, v in source.splits.items()} == {"train": 20265, "val": 2533, "test": 2533}
    first_val = study_procedure(25331, 0.2)["val"][0]
    assert source.splits["val"].ids[0] == f"ISIC_{first_val:07d}"
    assert source.splits["val"].labels[0] == first_val % 8


def test_chexpert_study_cut_at_full_size_shares_one_boundary_row_per_cut() -> None:
    """223,414 rows -> 178,717 / 22,350 / 22,349 (the study's inclusive `.loc` slices)."""
    paths = pd.Series([f"CheXpert-v1.0-small/train/patient{i // 3:05d}/study1/view{i % 3}.jpg" for i in range(223414)])
    parts = study_split(paths)
    assert {s: len(v) for s, v in parts.items()} == {"train": 178717, "val": 22350, "test": 22349}
    assert set(parts["train"]) & set(parts["val"]) == set()
    assert len(set(parts["train"]) & set(parts["test"])) == 1 and len(set(parts["val"]) & set(parts["test"])) == 1


def test_chexpert_study_cut_follows_pandas_label_slicing_on_release_order() -> None:
    """In release order study2 precedes study1 and study10 sorts before study2: the cut is by index label."""
    rows = [f"X/train/patient{p:05d}/study{s}/view1_frontal.jpg" for p in range(1, 9) for s in (2, 1, 10, 3)]
    frame = pd.DataFrame({"Path": rows}).sort_values(by=["Path"])
    cut = int(len(frame) * 0.2) + 15
    held = frame.loc[:cut]
    want = {"train": frame.loc[cut:], "val": held.loc[: int(len(held) / 2)], "test": held.loc[int(len(held) / 2):]}
    got = study_split(pd.Series(rows))
    assert all(got[s].tolist() == want[s].index.tolist() for s in want)
    assert got["train"][0] == cut and got["train"].tolist() != list(range(cut, len(rows)))


def test_grouped_split_keeps_each_patient_in_one_split_and_is_seeded() -> None:
    groups = [f"P{i // 4}" for i in range(400)]
    parts = grouped_split(groups, (0.7, 0.15, 0.15), seed=3)
    owners = [{groups[i] for i in parts[s]} for s in ("train", "val", "test")]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert sum(len(p) for p in parts.values()) == 400
    assert len(owners[0]) == 70 and len(owners[1]) == 15
    again, other = grouped_split(groups, (0.7, 0.15, 0.15), seed=3), grouped_split(groups, (0.7, 0.15, 0.15), seed=4)
    assert all(np.array_equal(parts[s], again[s]) for s in parts)
    assert not np.array_equal(parts["val"], other["val"])


def test_manifest_reader_refuses_missing_files_odd_shapes_and_unknown_splits(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(MedfmError, match="must map split names to lists of ids"):
        read_manifest(bad)
    bad.write_text(json.dumps({"train": ["a"], "holdout": ["b"]}))
    with pytest.raises(MedfmError, match="split\\(s\\) holdout"):
        read_manifest(bad)


def test_with_manifest_resplits_and_refuses_foreign_ids(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / cls / f"{i}.png")
    source = get_dataset("imagefolder", tmp_path)
    resplit = source.with_manifest({"train": ["a/0.png", "b/1.png"], "test": ["b/9.png"]})
    assert resplit.manifest() == {"train": ["a/0.png", "b/1.png"], "test": ["b/9.png"]}
    assert resplit.splits["train"].labels.tolist() == [0, 1]
    assert resplit.splits["test"].images == [tmp_path / "b" / "9.png"]
    with pytest.raises(MedfmError, match="1 id\\(s\\) that dataset 'imagefolder' does not hold .* c/0.png"):
        source.with_manifest({"train": ["a/0.png", "c/0.png"]})


@pytest.mark.parametrize("per_class", [3, 4])
def test_a_demo_too_small_to_stratify_splits_at_random_and_says_so(per_class: int) -> None:
    """3 or 4 images of each of 4 classes: sklearn cannot stratify val | test (it crashed before)."""
    with pytest.warns(SplitWarning, match=f"{4 * per_class} images are too few to stratify .* about 5 per class would do"):
        source = get_dataset("demo", None, per_class=per_class)
    ids = [i for split in source.splits.values() for i in split.ids]
    assert sorted(ids) == [f"demo-{i:05d}" for i in range(4 * per_class)] and all(len(s) for s in source.splits.values())
    with pytest.warns(SplitWarning):
        again = get_dataset("demo", None, per_class=per_class)
    assert source.manifest() == again.manifest()  # still seeded


def test_a_split_warns_exactly_when_it_cannot_stratify_and_names_the_classes_a_part_lacks() -> None:
    """Small-data fall-backs change nothing for data that stratifies: its split is sklearn's stratified one, silently,
    so cached manifests stay valid."""
    from sklearn.model_selection import train_test_split

    with pytest.warns(SplitWarning, match="split is random, not stratified; train has no image of .*c"):
        stratified_split(list("abcd"), np.arange(4), (0.6, 0.2, 0.2), seed=0, classes=("a", "b", "c", "d"))
    labels = np.array([i % 3 for i in range(50)] + [0] * 7)
    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=0.7, random_state=5, stratify=labels)
    val, test = train_test_split(rest, test_size=0.5, random_state=5, stratify=labels[rest])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning
        parts = stratified_split([str(i) for i in index], labels, (0.7, 0.15, 0.15), seed=5)
    assert {k: v.tolist() for k, v in parts.items()} == {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def test_too_few_images_for_three_parts_is_one_clear_error() -> None:
    with pytest.raises(MedfmError, match="2 images are too few for a train/val/test split of 70%/15%/15%: it needs at least 4 images"):
        stratified_split(["a", "b"], np.array([0, 1]), (0.7, 0.15, 0.15), seed=0)
