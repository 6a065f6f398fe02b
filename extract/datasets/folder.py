"""Users' own data: `imagefolder` (one sub-folder per class) and `csv` (a table of paths and labels).

Splits, in order of preference: the user's own (`train/ val/ test/` folders, or a split column), else a
seeded 70/15/15 split (`--split-seed`) that keeps each patient in one split when a patient column is
given (`--opt group_column=...`), and is stratified by label otherwise (a dataset too small to
stratify is split at random with a warning: see `extract.datasets.splits.stratified_split`).

What is refused, in one line each, before any work: fewer than two classes; a class folder without
images (hidden folders such as `.ipynb_checkpoints` are not classes); CSV labels that differ only in
case or surrounding spaces (`Pos` beside `pos`, which would silently make a third class); and CSV
image paths that lead outside the CSV's folder (`../..`, or an absolute path elsewhere), unless
`--opt allow_outside_root=true` says that is meant. Paths are compared as written, without following
symbolic links, so a linked image folder inside the CSV's folder stays allowed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Task, as_int, make_splits, metadata_columns, read_table, require_root
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import SPLIT_NAMES, grouped_split, stratified_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}  # decoded by extract/datasets/decode.py
FRACTIONS = (0.7, 0.15, 0.15)
DEFAULT_SEED = 42
FOLDER_LAYOUT = "root/<class>/<image>, or root/{train,val,test}/<class>/<image> to fix the split yourself"


def classification_task(classes: tuple[str, ...]) -> Task:
    kind = "binary" if len(classes) == 2 else "multiclass"
    return Task(kind, classes)


def seeded_split(ids: list[str], labels: np.ndarray, groups: list[str] | None, seed: int,
                 classes: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    if groups is not None:
        return grouped_split(groups, FRACTIONS, seed)
    return stratified_split(ids, labels, FRACTIONS, seed, classes=classes)


def text_id(relative: Path) -> str:
    """An image's id: its path under the root, with bytes that are not UTF-8 written as \\xNN (the cache stores UTF-8)."""
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def list_images(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def build_imagefolder(root: Path | None, *, split_seed: int = DEFAULT_SEED) -> DatasetSource:
    root = require_root(root, "imagefolder", FOLDER_LAYOUT)
    split_seed = as_int(split_seed, "split_seed")
    presplit = (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())
    tops = [root / s for s in SPLIT_NAMES if (root / s).is_dir()] if presplit else [root]
    classes = tuple(sorted({d.name for top in tops for d in top.iterdir() if d.is_dir() and not d.name.startswith(".")}))
    if len(classes) < 2:
        raise MedfmError(f"{tops[0]} holds {len(classes)} class folder(s); imagefolder expects {FOLDER_LAYOUT}")
    rows = [(top, path, label) for top in tops for label, cls in enumerate(classes) if (top / cls).is_dir()
            for path in list_images(top / cls)]
    if not rows:
        raise MedfmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; imagefolder expects {FOLDER_LAYOUT}")
    counts = np.bincount([label for _, _, label in rows], minlength=len(classes))
    empty = [cls for cls, n in zip(classes, counts, strict=True) if n == 0]
    if empty:
        raise MedfmError(f"class folder(s) {', '.join(f'{c}/' for c in empty)} under {root} hold no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder(s): every class needs images")
    ids = [text_id(path.relative_to(root)) for _, path, _ in rows]
    if len(set(ids)) < len(ids):
        twin = next(i for i, n in Counter(ids).items() if n > 1)
        raise MedfmError(f"two image files under {root} have the name {twin} once undecodable bytes are written as \\xNN; rename one")
    labels = np.array([label for _, _, label in rows], dtype=np.int64)
    paths = [path for _, path, _ in rows]
    if presplit:
        parts = {top.name: np.array([i for i, row in enumerate(rows) if row[0] == top], dtype=np.int64) for top in tops}
        options: dict[str, object] = {"split": "folders"}
    else:
        parts, options = seeded_split(ids, labels, None, split_seed, classes), {"split_seed": split_seed}
    return DatasetSource("imagefolder", classification_task(classes), make_splits(parts, ids, labels, paths), options=options)


def build_csv(
    root: Path | None, *, csv: str = "labels.csv", path_column: str = "path", label_column: str = "label",
    split_column: str = "", group_column: str = "", split_seed: int = DEFAULT_SEED, allow_outside_root: bool | str = False,
) -> DatasetSource:
    layout = (f"a CSV '{csv}' with columns '{path_column}' and '{label_column}' (optional split and patient columns), "
              "image paths relative to the CSV's folder and inside it; --root may also be the CSV file")
    root = require_root(root, "csv", layout, file_ok=True)
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
    check_labels(classes, table_path, label_column)
    labels = table[label_column].astype(str).map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    ids = table[path_column].tolist()
    paths = [table_path.parent / p for p in ids]
    if not as_bool(allow_outside_root, "allow_outside_root"):
        check_inside(ids, table_path)
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
        parts = seeded_split(ids, labels, groups, split_seed, classes)
        options |= {"group_column": group_column, "split_seed": split_seed}
    extra = [c for c in table.columns if c not in (path_column, label_column, split_column)]  # metadata: subgroup reports
    return DatasetSource("csv", classification_task(classes), make_splits(parts, ids, labels, paths, metadata_columns(table, extra)),
                         options=options)


def check_labels(classes: tuple[str, ...], table_path: Path, label_column: str) -> None:
    """At least two classes, and no two labels that differ only in case or surrounding spaces (`Pos` beside `pos`)."""
    if len(classes) < 2:
        raise MedfmError(f"{table_path}: column '{label_column}' holds only the label {', '.join(repr(c) for c in classes)}; "
                         "a classifier needs at least two classes")
    spellings: dict[str, list[str]] = {}
    for name in classes:
        spellings.setdefault(name.strip().casefold(), []).append(name)
    twins = [names for names in spellings.values() if len(names) > 1]
    if twins:
        shown = "; ".join(" and ".join(repr(n) for n in names) for names in twins[:3])
        raise MedfmError(f"{table_path}: column '{label_column}' holds labels that differ only in case or spaces ({shown}), "
                         "which would be separate classes; spell each class one way")


def check_inside(ids: list[str], table_path: Path) -> None:
    """Every image path, joined to the CSV's folder as written (symbolic links not followed), stays inside that folder."""
    base = os.path.abspath(table_path.parent)
    outside = [(i, p) for i, p in enumerate(ids) if os.path.commonpath([base, os.path.normpath(os.path.join(base, p))]) != base]
    if outside:
        line, path = outside[0]
        raise MedfmError(f"{table_path}: line {line + 2} names {path}, outside {base} ({len(outside)} such path(s)); "
                         "keep the images under the CSV's folder, or pass --opt allow_outside_root=true to read them there")


def as_bool(value: object, option: str) -> bool:
    """A yes/no dataset option (from --opt it arrives as text)."""
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise MedfmError(f"--opt {option}={value} must be true or false")


register(DatasetEntry(
    name="imagefolder", description="your own data, one folder per class",
    task="binary (ROC-AUC) or multiclass (accuracy), from the folders", layout=FOLDER_LAYOUT,
    build=build_imagefolder, split="train/val/test folders if present, else stratified 70/15/15 (--split-seed)",
))
register(DatasetEntry(
    name="csv", description="your own data, a CSV of image paths and labels",
    task="binary (ROC-AUC) or multiclass (accuracy), from the labels",
    layout="root/labels.csv (path,label; --opt csv= path_column= label_column=) + images under root "
           "(--opt allow_outside_root=true to read paths that lead outside it)",
    build=build_csv,
    split="--opt split_column=COL (train/val/test), else 70/15/15 (--split-seed), patient-grouped with --opt group_column=COL",
))
