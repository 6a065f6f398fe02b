"""Users' own data: `imagefolder` (one sub-folder per class) and `csv` (a table of paths and labels).

Splits, in order of preference: the user's own (`train/ val/ test/` folders, or a split column), else a
seeded 70/15/15 split (`--split-seed`) that keeps each patient in one split when a patient column is
given (`--opt group_column=...`), and is stratified by label otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import MedfmError
from extract.datasets import DatasetEntry, register
from extract.datasets.base import DatasetSource, Task, as_int, make_splits, read_table, require_root
from extract.datasets.splits import SPLIT_NAMES, grouped_split, stratified_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 42
FOLDER_LAYOUT = "root/<class>/<image>, or root/{train,val,test}/<class>/<image> to fix the split yourself"


def classification_task(classes: tuple[str, ...]) -> Task:
    kind = "binary" if len(classes) == 2 else "multiclass"
    return Task(kind, classes)


def seeded_split(ids: list[str], labels: np.ndarray, groups: list[str] | None, seed: int) -> dict[str, np.ndarray]:
    return grouped_split(groups, FRACTIONS, seed) if groups is not None else stratified_split(ids, labels, FRACTIONS, seed)


def list_images(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def build_imagefolder(root: Path | None, *, split_seed: int = DEFAULT_SEED) -> DatasetSource:
    root = require_root(root, "imagefolder", FOLDER_LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    presplit = (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())
    tops = [root / s for s in SPLIT_NAMES if (root / s).is_dir()] if presplit else [root]
    classes = tuple(sorted({d.name for top in tops for d in top.iterdir() if d.is_dir()}))
    if len(classes) < 2:
        raise MedfmError(f"{tops[0]} holds {len(classes)} class folder(s); imagefolder expects {FOLDER_LAYOUT}")
    rows = [(top, path, label) for top in tops for label, cls in enumerate(classes) if (top / cls).is_dir()
            for path in list_images(top / cls)]
    if not rows:
        raise MedfmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; imagefolder expects {FOLDER_LAYOUT}")
    ids = [str(path.relative_to(root)) for _, path, _ in rows]
    labels = np.array([label for _, _, label in rows], dtype=np.int64)
    paths = [path for _, path, _ in rows]
    if presplit:
        parts = {top.name: np.array([i for i, row in enumerate(rows) if row[0] == top], dtype=np.int64) for top in tops}
        options: dict[str, object] = {"split": "folders"}
    else:
        parts, options = seeded_split(ids, labels, None, split_seed), {"split_seed": split_seed}
    return DatasetSource("imagefolder", classification_task(classes), make_splits(parts, ids, labels, paths), options=options)


def build_csv(
    root: Path | None, *, csv: str = "labels.csv", path_column: str = "path", label_column: str = "label",
    split_column: str = "", group_column: str = "", split_seed: int = DEFAULT_SEED,
) -> DatasetSource:
    layout = (f"a CSV '{csv}' with columns '{path_column}' and '{label_column}' (optional split and patient columns), "
              "image paths relative to the CSV's folder; --root may also be the CSV file")
    root = require_root(root, "csv", layout)
    split_seed = as_int(split_seed, "split_seed")
    table_path = root if root.is_file() else root / csv
    if not table_path.is_file():
        raise MedfmError(f"{table_path} does not exist; the csv dataset expects {layout}")
    required = [c for c in (path_column, label_column, split_column, group_column) if c]
    table = read_table(table_path, required, dtype={path_column: str})
    blank = table[required].isna().any(axis=1)
    if blank.any():
        rows = ", ".join(str(i + 2) for i in np.flatnonzero(blank)[:3])  # +2: header line, 1-based
        raise MedfmError(f"{table_path}: line(s) {rows} have an empty {' / '.join(required)} value")
    repeated = table[path_column][table[path_column].duplicated()]
    if len(repeated):
        raise MedfmError(f"{table_path}: column '{path_column}' names {', '.join(repeated.head(3))} more than once; each image once")
    classes = tuple(sorted(map(str, table[label_column].unique())))
    labels = table[label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    ids = table[path_column].tolist()
    paths = [table_path.parent / p for p in ids]
    options: dict[str, object] = {"csv": table_path.name, "path_column": path_column, "label_column": label_column}
    if split_column:
        names = table[split_column].astype(str).str.strip().str.lower()
        odd = sorted(set(names) - set(SPLIT_NAMES))
        if odd:
            raise MedfmError(f"{table_path}: column '{split_column}' holds {', '.join(odd)}; use train, val or test")
        parts = {s: np.flatnonzero(names.to_numpy() == s) for s in SPLIT_NAMES if (names == s).any()}
        options["split_column"] = split_column
    else:
        groups = table[group_column].astype(str).tolist() if group_column else None
        parts = seeded_split(ids, labels, groups, split_seed)
        options |= {"group_column": group_column, "split_seed": split_seed}
    return DatasetSource("csv", classification_task(classes), make_splits(parts, ids, labels, paths), options=options)


register(DatasetEntry(
    name="imagefolder", description="your own data, one folder per class",
    task="binary (ROC-AUC) or multiclass (accuracy), from the folders", layout=FOLDER_LAYOUT,
    build=build_imagefolder, split="train/val/test folders if present, else stratified 70/15/15 (--split-seed)",
))
register(DatasetEntry(
    name="csv", description="your own data, a CSV of image paths and labels",
    task="binary (ROC-AUC) or multiclass (accuracy), from the labels",
    layout="root/labels.csv (path,label; --opt csv= path_column= label_column=) + images",
    build=build_csv,
    split="--opt split_column=COL (train/val/test), else 70/15/15 (--split-seed), patient-grouped with --opt group_column=COL",
))
