"""Users' own data: `imagefolder` (one sub-folder per class) and `csv` (a table of paths and labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.errors import MedfmError
from extract.datasets import DatasetEntry, register
from extract.datasets.base import DEFAULT_METRIC, DatasetSource, Split, Task, require_root, stratified_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
FRACTIONS = (0.7, 0.15, 0.15)


def from_table(name: str, ids: list[str], paths: list[Path], labels: np.ndarray, classes: tuple[str, ...], split_seed: int) -> DatasetSource:
    """Seeded stratified 70/15/15 splits over a flat list of labelled images."""
    kind = "binary" if len(classes) == 2 else "multiclass"
    parts = stratified_split(ids, labels, FRACTIONS, seed=split_seed)
    splits = {s: Split([ids[i] for i in idx], labels[idx], [paths[i] for i in idx]) for s, idx in parts.items()}
    return DatasetSource(name, Task(kind, classes, DEFAULT_METRIC[kind]), splits, options={"split_seed": split_seed})


def build_imagefolder(root: Path | None, *, split_seed: int = 42, **_: object) -> DatasetSource:
    layout = "one sub-folder per class with images inside (root/<class>/<image>)"
    root = require_root(root, "imagefolder", layout)
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise MedfmError(f"{root} holds {len(classes)} class folders; imagefolder expects {layout}")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    ids = [str(p.relative_to(root)) for p in paths]
    return from_table("imagefolder", ids, paths, np.array(labels, dtype=np.int64), classes, int(split_seed))


def build_csv(root: Path | None, *, csv: str = "labels.csv", path_column: str = "path", label_column: str = "label", split_seed: int = 42, **_: object) -> DatasetSource:
    layout = f"a CSV '{csv}' with columns '{path_column}' and '{label_column}', image paths relative to the root"
    root = require_root(root, "csv", layout)
    table_path = root / csv
    if not table_path.exists():
        raise MedfmError(f"{table_path} does not exist; the csv dataset expects {layout}")
    table = pd.read_csv(table_path)
    missing = [c for c in (path_column, label_column) if c not in table.columns]
    if missing:
        raise MedfmError(f"{table_path} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}")
    classes = tuple(sorted(map(str, table[label_column].unique())))
    labels = table[label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    ids = table[path_column].astype(str).tolist()
    return from_table("csv", ids, [root / p for p in ids], labels, classes, int(split_seed))


register(DatasetEntry(
    name="imagefolder", description="your own data, one folder per class",
    task="binary or multiclass from the folders; ROC-AUC or accuracy", layout="root/<class>/<image>",
    build=build_imagefolder,
))
register(DatasetEntry(
    name="csv", description="your own data, a CSV of image paths and labels",
    task="binary or multiclass from the labels; ROC-AUC or accuracy", layout="root/labels.csv (path,label) + images",
    build=build_csv,
))
