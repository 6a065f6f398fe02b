"""`idrid`: diabetic-retinopathy grades of IDRiD's "B. Disease Grading" part, a transfer partner of `aptos2019`.

The release (IEEE DataPort) holds `1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NNN.jpg` and
`2. Groundtruths/{a,b}. IDRiD_Disease Grading_{Training,Testing} Labels.csv` (Image name, Retinopathy grade,
Risk of macular edema). Its official split is kept: 413 training and 103 test images. Both sets number their
images from IDRiD_001, so an id is `train/IDRiD_001` or `test/IDRiD_001`. IDRiD publishes no patient ids:
validation is a seeded 10% of the training images, stratified by grade (docs/transfer.md §2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import MedfmError
from extract.datasets.base import (
    DatasetSource,
    Task,
    as_int,
    make_splits,
    metadata_columns,
    read_table,
    require_file,
    require_root,
)
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import STUDY_SEED, stratified_group_folds

CLASSES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")  # ICDR grades 0-4, named as aptos2019's
PART = "B. Disease Grading"
IMAGES = {"train": "1. Original Images/a. Training Set", "test": "1. Original Images/b. Testing Set"}
LABELS = {"train": "2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv",
          "test": "2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv"}
GRADE, NAME, EDEMA = "Retinopathy grade", "Image name", "Risk of macular edema"
LAYOUT = (f"the '{PART}' folder (or its parent): '{IMAGES['train']}/' and '{IMAGES['test']}/' of <Image name>.jpg, "
          f"'{LABELS['train']}' and '{LABELS['test']}' ({NAME}, {GRADE}, {EDEMA})")
VAL_FOLDS = 10  # validation: one of ten stratified folds of the training images
TASK = Task("multiclass", CLASSES, "quadratic_kappa")  # aptos2019's metric: its partner; declared at import


def find_part(root: Path) -> Path:
    """The folder holding `2. Groundtruths`: `root`, its `B. Disease Grading`, or that folder's own (zips nest it twice)."""
    for candidate in (root, root / PART, root / PART / PART):
        if (candidate / "2. Groundtruths").is_dir():
            return candidate
    raise MedfmError(f"{root} holds no '2. Groundtruths' folder; dataset 'idrid' expects {LAYOUT}")


def read_grades(part: Path, split: str) -> pd.DataFrame:
    """One ground-truth CSV, without the release's blank trailing rows and columns; every grade 0-4."""
    path = require_file(part / LABELS[split], "idrid", LAYOUT)
    table = read_table(path, [NAME, GRADE], dtype={NAME: str})
    table.columns = table.columns.str.strip()  # the release writes "Risk of macular edema " with a trailing space
    table = table.dropna(subset=[NAME]).reset_index(drop=True)
    graded = table[GRADE].isin(range(len(CLASSES)))
    if not graded.all():
        bad = table.loc[~graded, NAME].head(3).tolist()
        raise MedfmError(f"{path}: {GRADE} must be a grade 0-4; rows {', '.join(bad)} are not")
    return table


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    part = find_part(require_root(root, "idrid", LAYOUT))
    split_seed = as_int(split_seed, "split_seed")
    train, test = read_grades(part, "train"), read_grades(part, "test")
    table = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    ids = [f"{s}/{name}" for s, name in zip(table["split"], table[NAME], strict=True)]
    images = [part / IMAGES[s] / f"{name}.jpg" for s, name in zip(table["split"], table[NAME], strict=True)]
    labels = table[GRADE].to_numpy(np.int64)
    held = stratified_group_folds(labels[: len(train)], ids[: len(train)], VAL_FOLDS, split_seed)[0]
    parts = {"train": np.setdiff1d(np.arange(len(train)), held), "val": held, "test": np.arange(len(train), len(table))}
    return DatasetSource(
        name="idrid",
        task=TASK,
        splits=make_splits(parts, ids, labels, images, metadata_columns(table, (EDEMA,))),
        options={"split_seed": split_seed},
    )


register(DatasetEntry(
    name="idrid", description="IDRiD disease grading, fundus photographs; partner of aptos2019",
    task="multiclass, 5 grades; quadratic kappa, as aptos2019", layout=LAYOUT, build=build,
    split="official train/test (413/103); val = a seeded 10% of train, stratified by grade (no patient ids)",
    classes=CLASSES,
))
