"""`isic2019`: the eight ISIC 2019 skin-lesion classes, with the study's 80/10/10 seeded split.

The ground-truth CSV is one-hot over MEL..SCC plus UNK; UNK is never positive in the training set, so
each row must carry exactly one positive among the eight classes. The study's split holds out 20% of
the rows (seed 42) and halves it: 20265/2533/2533 of the 25,331 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
from extract.datasets.splits import STUDY_SEED, study_holdout

CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA_FILE = "ISIC_2019_Training_Metadata.csv"  # optional: read when present, for subgroup reports
METADATA = ("age_approx", "anatom_site_general", "sex")
# The release's image folder; Kaggle mirrors nest it once more (tried first), the study renamed it `train`.
IMAGE_DIRS = ("ISIC_2019_Training_Input/ISIC_2019_Training_Input", "ISIC_2019_Training_Input", "train")
LAYOUT = f"{GROUND_TRUTH} (image, MEL..SCC, UNK one-hot) and ISIC_2019_Training_Input/<image>.jpg"
HOLDOUT = 0.2
TASK = Task("multiclass", CLASSES, "macro_recall")  # declared at import: a bad metric fails here


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    root = require_root(root, "isic2019", LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    table_path = require_file(root / GROUND_TRUTH, "isic2019", LAYOUT)
    table = read_table(table_path, ["image", *CLASSES], dtype={"image": str})
    onehot = table[list(CLASSES)].to_numpy(np.float64)
    single = (onehot == 1).sum(axis=1) == 1
    if not single.all():
        bad = table.loc[~single, "image"].head(3).tolist()
        raise MedfmError(f"{table_path}: every row needs exactly one positive among {', '.join(CLASSES)}; "
                         f"{', '.join(bad)} have none or several (UNK rows are not part of the study)")
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise MedfmError(f"{root} has no image folder ({' or '.join(IMAGE_DIRS)}); dataset 'isic2019' expects {LAYOUT}")
    ids = table["image"].tolist()
    images = [image_dir / f"{i}.jpg" for i in ids]
    parts = study_holdout(len(ids), HOLDOUT, split_seed)
    metadata = {}
    if (root / METADATA_FILE).is_file():
        extra = read_table(root / METADATA_FILE, ["image"], dtype={"image": str}).drop_duplicates("image").set_index("image")
        metadata = metadata_columns(extra.reindex(ids).reset_index(), METADATA)
    return DatasetSource(
        name="isic2019",
        task=TASK,
        splits=make_splits(parts, ids, onehot.argmax(axis=1).astype(np.int64), images, metadata),
        options={"split_seed": split_seed},
        study_norm=((0.6678, 0.5296, 0.5243), (0.2238, 0.2036, 0.2154)),
    )


register(DatasetEntry(
    name="isic2019", description="ISIC 2019 dermoscopy, 8 lesion classes",
    task="multiclass, 8 classes; macro recall (balanced accuracy)", layout=LAYOUT, build=build,
    split="study: random.Random(42) shuffle, 20% held out and halved (20265/2533/2533)", classes=CLASSES,
))
