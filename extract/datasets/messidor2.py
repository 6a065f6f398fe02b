"""`messidor2`: Messidor-2 fundus photographs with their adjudicated DR grades, a transfer partner of `aptos2019`.

The images come from ADCIS (`IMAGES/`, 1,748 images of 874 examinations, one per eye, with `messidor-2.csv` pairing
the two images of each examination, `;`-separated); the grades from Kaggle's "Messidor-2 DR grades"
(`messidor_data.csv`: image_id, adjudicated_dr_grade, adjudicated_dme, adjudicated_gradable; Krause et al. 2018).
The 4 images adjudicated ungradable have no grade and are left out (1,744 remain): `extract datasets` says so.
There is no official split: ten seeded folds stratified by grade and grouped by examination (both eyes of a patient
in one part), folds 1-8 train, 9 validation, 10 test (docs/transfer.md §2). Without `messidor-2.csv` each image is
its own group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import MedfmError
from extract.datasets.base import (
    DatasetSource,
    Task,
    as_int,
    index_images,
    make_splits,
    metadata_columns,
    read_table,
    require_file,
    require_root,
)
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import STUDY_SEED, stratified_group_split

CLASSES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")  # ICDR grades 0-4, named as aptos2019's
GRADES_FILE, PAIRS_FILE = "messidor_data.csv", "messidor-2.csv"
ID, GRADE, GRADABLE = "image_id", "adjudicated_dr_grade", "adjudicated_gradable"
IMAGE_DIRS = ("IMAGES", "images")
LAYOUT = (f"{GRADES_FILE} ({ID}, {GRADE}, adjudicated_dme, {GRADABLE}) and IMAGES/<image_id>; "
          f"optional {PAIRS_FILE} (the two images of each examination, ';'-separated) to keep examinations together")
TASK = Task("multiclass", CLASSES, "quadratic_kappa")  # aptos2019's metric: its partner; declared at import


def examinations(root: Path, ids: list[str]) -> list[str]:
    """A group per image: its examination's row in `messidor-2.csv` when present (a header or unknown names are
    ignored), else the image itself."""
    group = {i.lower(): i for i in ids}
    path = root / PAIRS_FILE
    if path.is_file():
        for row, line in enumerate(path.read_text(errors="replace").splitlines()):
            for name in line.replace(",", ";").split(";"):
                if name.strip().lower() in group:
                    group[name.strip().lower()] = f"exam{row}"
    return [group[i.lower()] for i in ids]


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    root = require_root(root, "messidor2", LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    table_path = require_file(root / GRADES_FILE, "messidor2", LAYOUT)
    table = read_table(table_path, [ID, GRADE, GRADABLE], dtype={ID: str})
    table = table[table[GRADABLE] != 0].reset_index(drop=True)  # ungradable: no grade to learn or score
    graded = table[GRADE].isin(range(len(CLASSES)))
    if not graded.all():
        bad = table.loc[~graded, ID].head(3).tolist()
        raise MedfmError(f"{table_path}: {GRADE} of a gradable image must be a grade 0-4; rows {', '.join(bad)} are not")
    if not any((root / d).is_dir() for d in IMAGE_DIRS):
        raise MedfmError(f"{root} has no IMAGES folder; dataset 'messidor2' expects {LAYOUT}")
    found = index_images([root / d for d in IMAGE_DIRS])
    ids = table[ID].tolist()
    images = [found.get(i.lower(), root / IMAGE_DIRS[0] / i) for i in ids]  # a missing one is named at extraction
    labels = table[GRADE].to_numpy(np.int64)
    return DatasetSource(
        name="messidor2",
        task=TASK,
        splits=make_splits(stratified_group_split(labels, examinations(root, ids), split_seed), ids, labels, images,
                           metadata_columns(table, ("adjudicated_dme",))),
        options={"split_seed": split_seed},
    )


register(DatasetEntry(
    name="messidor2", description="Messidor-2 fundus photos, adjudicated DR grades; partner of aptos2019",
    task="multiclass, 5 grades; quadratic kappa, as aptos2019; ungradable images (4 in the release) are left out",
    layout=LAYOUT, build=build,
    split="no official split: 10 seeded folds stratified by grade, grouped by examination; 8 train, 1 val, 1 test",
    classes=CLASSES,
))
