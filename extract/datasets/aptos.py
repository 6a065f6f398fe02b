"""`aptos2019`: diabetic-retinopathy grades from the Kaggle APTOS 2019 release, with the study's split.

The study used the 3,662 images of Kaggle's `train.csv` (the competition's test set has no labels)
and split them with its seeded hold-out: 30% held out, halved into validation and test (2564/549/549).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Task, as_int, make_splits, read_table, require_file, require_root
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import STUDY_SEED, study_holdout

CLASSES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")
LAYOUT = "train.csv (id_code, diagnosis) and train_images/<id_code>.png, as unzipped from Kaggle"
HOLDOUT = 0.3
TASK = Task("multiclass", CLASSES, "quadratic_kappa")  # declared at import: a bad metric fails here


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    root = require_root(root, "aptos2019", LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    table_path = require_file(root / "train.csv", "aptos2019", LAYOUT)
    table = read_table(table_path, ["id_code", "diagnosis"], dtype={"id_code": str})
    graded = table["diagnosis"].isin(range(len(CLASSES)))
    if not graded.all():
        bad = table.loc[~graded, "id_code"].head(3).tolist()
        raise MedfmError(f"{table_path}: diagnosis must be a grade 0-4; rows {', '.join(bad)} are not")
    labels = table["diagnosis"].to_numpy(np.int64)
    ids = table["id_code"].tolist()
    images = [root / "train_images" / f"{i}.png" for i in ids]
    parts = study_holdout(len(ids), HOLDOUT, split_seed)
    return DatasetSource(
        name="aptos2019",
        task=TASK,
        splits=make_splits(parts, ids, labels, images),
        options={"split_seed": split_seed},
        study_norm=((0.415, 0.221, 0.073), (0.275, 0.150, 0.081)),
    )


register(DatasetEntry(
    name="aptos2019", description="APTOS 2019 blindness detection (Kaggle), fundus photographs",
    task="multiclass, 5 grades; quadratic kappa", layout=LAYOUT, build=build,
    split="study: random.Random(42) shuffle, 30% held out and halved (2564/549/549)", classes=CLASSES,
))
