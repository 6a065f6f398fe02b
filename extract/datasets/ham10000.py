"""`ham10000`: the seven HAM10000 dermoscopy classes (Tschandl et al. 2018), a transfer partner of `isic2019`.

The release is `HAM10000_metadata.csv` (one row per image: lesion_id, image_id, dx, dx_type, age, sex,
localization) and the 10,015 images split over `HAM10000_images_part_1/` and `HAM10000_images_part_2/`.
It has no official split, and 7,470 lesions: many are photographed more than once, so the split keeps each
lesion in one part (docs/transfer.md §2): ten seeded folds stratified by dx and grouped by lesion_id,
folds 1-8 train, 9 validation, 10 test (about 80/10/10).
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

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
METADATA_FILE = "HAM10000_metadata.csv"
METADATA = ("dx_type", "age", "sex", "localization")  # per-image columns kept for subgroup reports
# the release's two image folders; the Kaggle mirror adds lower-case copies of both
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "ham10000_images_part_1", "ham10000_images_part_2")
LAYOUT = f"{METADATA_FILE} (lesion_id, image_id, dx, ...) and HAM10000_images_part_1/, HAM10000_images_part_2/ of <image_id>.jpg"
TASK = Task("multiclass", CLASSES, "macro_recall")  # isic2019's metric: its partner; declared at import


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    root = require_root(root, "ham10000", LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    table_path = require_file(root / METADATA_FILE, "ham10000", LAYOUT)
    table = read_table(table_path, ["lesion_id", "image_id", "dx"], dtype={"lesion_id": str, "image_id": str, "dx": str})
    unknown = sorted(set(table["dx"]) - set(CLASSES))
    if unknown:
        raise MedfmError(f"{table_path}: dx must be one of {', '.join(CLASSES)}; found {', '.join(map(str, unknown))}")
    if not any((root / d).is_dir() for d in IMAGE_DIRS):
        raise MedfmError(f"{root} has no image folder ({', '.join(IMAGE_DIRS[:2])}); dataset 'ham10000' expects {LAYOUT}")
    found = index_images([root / d for d in IMAGE_DIRS])
    ids = table["image_id"].tolist()
    images = [found.get(f"{i}.jpg".lower(), root / IMAGE_DIRS[0] / f"{i}.jpg") for i in ids]  # a missing one is named at extraction
    labels = table["dx"].map(CLASSES.index).to_numpy(np.int64)
    return DatasetSource(
        name="ham10000",
        task=TASK,
        splits=make_splits(stratified_group_split(labels, table["lesion_id"].tolist(), split_seed), ids, labels, images,
                           metadata_columns(table, METADATA)),
        options={"split_seed": split_seed},
    )


register(DatasetEntry(
    name="ham10000", description="HAM10000 dermoscopy, 7 lesion classes; partner of isic2019",
    task="multiclass, 7 classes; macro recall (balanced accuracy), as isic2019", layout=LAYOUT, build=build,
    split="no official split: 10 seeded folds stratified by dx, grouped by lesion_id; 8 train, 1 val, 1 test",
    classes=CLASSES,
))
