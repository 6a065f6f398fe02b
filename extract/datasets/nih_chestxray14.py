"""`chestxray14`: the 14 findings of NIH ChestX-ray14 (Wang et al. 2017), a transfer partner of `chexpert`.

The release: `Data_Entry_2017.csv` (Image Index, Finding Labels `|`-separated or "No Finding", Follow-up #,
Patient ID, Patient Age, Patient Gender, View Position, ...; the 2020 update names it `Data_Entry_2017_v2020.csv`),
the official patient-disjoint split lists `train_val_list.txt` (86,524 images) and `test_list.txt` (25,596), and the
112,120 PNGs in `images_001/images/` .. `images_012/images/` (NIH's tar files unpack to `images/`). The test list is
the test split; validation is 10% of the train_val patients, seeded (docs/transfer.md §2). "No Finding" is the
absence of all 14 labels, not a label.
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
from extract.datasets.splits import STUDY_SEED, grouped_holdout

LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")  # the release's order
NO_FINDING = "No Finding"
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
IMAGE, FINDINGS, PATIENT = "Image Index", "Finding Labels", "Patient ID"
METADATA = ("Patient Age", "Patient Gender", "View Position")  # per-image columns kept for subgroup reports
LAYOUT = (f"{ENTRY_FILES[0]} ({IMAGE}, {FINDINGS}, {PATIENT}, ...), {LISTS['train_val']}, {LISTS['test']} "
          "and the PNGs in images_*/images/ (or images/)")
VAL_FRACTION = 0.1
TASK = Task("multilabel", LABELS, "mean_roc_auc")  # chexpert's metric: its partner; declared at import


def read_list(path: Path) -> list[str]:
    lines = require_file(path, "chestxray14", LAYOUT).read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def findings(labels: list[str], table_path: Path) -> np.ndarray:
    """`|`-separated finding names -> [N, 14] float32 0/1; "No Finding" is a row of zeros; anything else is refused."""
    out = np.zeros((len(labels), len(LABELS)), dtype=np.float32)
    for row, text in enumerate(labels):
        for name in str(text).split("|"):
            if name in LABELS:
                out[row, LABELS.index(name)] = 1.0
            elif name != NO_FINDING:
                raise MedfmError(f"{table_path}: row {row + 2} names finding '{name}', not one of {NO_FINDING}, "
                                 f"{', '.join(LABELS)}")
    return out


def image_folders(root: Path) -> list[Path]:
    """The release's image folders: images_001/images .. images_012/images (or images_0NN, or images/ itself)."""
    tops = sorted(p for p in root.glob("images*") if p.is_dir())
    return [d for top in tops for d in (top / "images", top)]


def build(root: Path | None, *, split_seed: int = STUDY_SEED) -> DatasetSource:
    root = require_root(root, "chestxray14", LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    table_path = next((root / f for f in ENTRY_FILES if (root / f).is_file()), root / ENTRY_FILES[0])
    table = read_table(require_file(table_path, "chestxray14", LAYOUT), [IMAGE, FINDINGS, PATIENT],
                       dtype={IMAGE: str, PATIENT: str})
    train_val, test = read_list(root / LISTS["train_val"]), read_list(root / LISTS["test"])
    row = {name: k for k, name in enumerate(table[IMAGE])}
    unknown = [name for name in train_val + test if name not in row]
    if unknown:
        raise MedfmError(f"{len(unknown)} image(s) of the split lists are not in {table_path.name}, "
                         f"e.g. {', '.join(unknown[:3])}")
    both = set(train_val) & set(test)
    if both:
        raise MedfmError(f"{len(both)} image(s) are in both {LISTS['train_val']} and {LISTS['test']}, e.g. {', '.join(sorted(both)[:3])}")
    unlisted = len(table) - len(set(train_val + test))
    if unlisted:
        raise MedfmError(f"{unlisted} row(s) of {table_path.name} are in neither {LISTS['train_val']} nor {LISTS['test']}; "
                         "the release lists every image in one of them")
    order = [row[name] for name in train_val + test]  # rows in list order
    labels = findings(table[FINDINGS].tolist(), table_path)[order]
    table = table.iloc[order].reset_index(drop=True)
    kept, held = grouped_holdout(table[PATIENT].to_numpy()[: len(train_val)], VAL_FRACTION, split_seed)
    parts = {"train": kept, "val": held, "test": np.arange(len(train_val), len(table))}
    folders = image_folders(root)
    if not folders:
        raise MedfmError(f"{root} has no images_* folder; dataset 'chestxray14' expects {LAYOUT}")
    found = index_images(folders)
    ids = table[IMAGE].tolist()
    images = [found.get(i.lower(), folders[0] / i) for i in ids]  # a missing one is named at extraction
    return DatasetSource(
        name="chestxray14",
        task=TASK,
        splits=make_splits(parts, ids, labels, images, metadata_columns(table, METADATA)),
        grayscale=True,
        options={"split_seed": split_seed},
    )


register(DatasetEntry(
    name="chestxray14", description="NIH ChestX-ray14 chest X-rays, 14 findings; partner of chexpert",
    task="multilabel, 14 labels; mean ROC-AUC, as chexpert", layout=LAYOUT, build=build,
    split="official train_val/test lists; val = 10% of train_val patients (seeded)",
    classes=LABELS,
))
