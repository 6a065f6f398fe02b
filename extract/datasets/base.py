"""What every dataset is: ids, images and labels per split, plus the `Task` the probes need.

A dataset module only parses its released layout into a `DatasetSource`; decoding, transforms,
bad-image handling and caching are shared (here and in the runner).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cache.schema import Task
from common.errors import MedfmError
from extract.datasets.decode import open_image  # the default `load_image`; the decoding rules live in decode.py
from extract.datasets.splits import stratified_split  # noqa: F401  (re-exported for dataset modules)

__all__ = ["DatasetSource", "Split", "Task", "stratified_split"]

@dataclass
class Split:
    """One split: ids, labels and an image reference per id.

    Labels are [N] int64 class indices, or [N, C] float32 for multilabel tasks, where NaN marks a label
    that is unknown (CheXpert's `policy=ignore`): losses and metrics must mask NaN entries out.
    """

    ids: list[str]
    labels: np.ndarray
    images: Sequence[Any]  # whatever the source's `load_image` takes: usually paths
    metadata: dict[str, list[str]] = field(default_factory=dict)  # per-sample columns (Sex, Age, ...) as text, "" when blank

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DatasetSource:
    """A dataset ready for extraction: per-split ids/labels/images, the task, and how to open an image."""

    name: str
    task: Task
    splits: dict[str, Split]
    grayscale: bool = False  # one channel in the study (DDSM, CheXpert); replicated to RGB unless --in-chans 1
    study_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # the study's fixed mean/std (docs/protocol.md §1)
    load_image: Callable[[Any], Image.Image] = open_image
    options: dict[str, Any] = field(default_factory=dict)  # the options that shaped it (fingerprinted)
    # partner dataset -> {own class: partner class, or None}: descriptive, never fingerprinted (extract/datasets/label_maps.py)
    label_maps: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def manifest(self) -> dict[str, list[str]]:
        """Ids per split, in row order: the split assignment saved beside every cache and run."""
        return {name: list(split.ids) for name, split in self.splits.items()}

    def with_manifest(self, manifest: dict[str, list[str]]) -> DatasetSource:
        """The same data re-split as a saved manifest says; refuses ids this dataset does not hold."""
        rows = {i: (split, k) for split in self.splits.values() for k, i in enumerate(split.ids)}
        unknown = [i for ids in manifest.values() for i in ids if i not in rows]
        if unknown:
            raise MedfmError(f"the manifest names {len(unknown)} id(s) that dataset '{self.name}' does not hold under this "
                             f"--root, e.g. {', '.join(unknown[:3])}; it was saved for other data or options")
        empty = next(iter(self.splits.values())).labels[:0]
        splits = {}
        for name, ids in manifest.items():
            picks = [rows[i] for i in ids]
            labels = np.stack([split.labels[k] for split, k in picks]) if picks else empty
            columns = next(iter(self.splits.values())).metadata.keys()
            splits[name] = Split(list(ids), labels, [split.images[k] for split, k in picks],
                                 {c: [split.metadata[c][k] for split, k in picks] for c in columns})
        return replace(self, splits=splits)


def require_root(root: Path | None, dataset: str, layout: str, file_ok: bool = False) -> Path:
    """The dataset folder (or file, where `file_ok`: a CSV, a .npz), or a clear error saying what belongs there."""
    if root is None:
        raise MedfmError(f"dataset '{dataset}' needs --root PATH, a folder holding {layout}")
    root = Path(root).expanduser()
    if not root.exists():
        raise MedfmError(f"--root {root} does not exist; dataset '{dataset}' expects {layout}")
    if not file_ok and not root.is_dir():
        raise MedfmError(f"--root {root} is a file, not a folder; dataset '{dataset}' expects a folder holding {layout}")
    return root


def require_file(path: Path, dataset: str, layout: str) -> Path:
    """A file the layout needs, or a clear error naming it."""
    if not path.is_file():
        raise MedfmError(f"{path} does not exist; dataset '{dataset}' expects {layout}")
    return path


def index_images(folders: Sequence[Path]) -> dict[str, Path]:
    """Lower-cased file name -> path over the `folders` that exist, the first folder winning.

    One listing per folder instead of a lookup per image (NIH ChestX-ray14 spreads 112,120 images over
    12 folders); lower-cased because releases and their CSVs disagree on case (Messidor-2's `.JPG`).
    """
    index: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        index.setdefault(entry.name.lower(), Path(entry.path))
    return index


def read_table(path: Path, required: Sequence[str], **read_csv: Any) -> pd.DataFrame:
    """A CSV that must hold `required` columns; a missing one is named, with the columns found."""
    try:
        table = pd.read_csv(path, **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MedfmError(f"cannot parse {path} as CSV: {' '.join(str(err).split())}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise MedfmError(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}")
    return table


def make_splits(parts: dict[str, np.ndarray], ids: Sequence[str], labels: np.ndarray, images: Sequence[Any],
                metadata: dict[str, list[str]] | None = None) -> dict[str, Split]:
    """`Split`s from index arrays into flat id/label/image (and metadata) lists (index order is row order)."""
    nul = next((i for i, name in enumerate(ids) if "\x00" in str(name)), None)
    if nul is not None:  # a cache stores ids as HDF5 text, which cannot hold one
        raise MedfmError(f"sample {nul} of the dataset ({ids[nul]!r}) has a NUL byte in its name or path; remove it from the file "
                         "name or from the CSV that lists it")
    metadata = metadata or {}
    return {name: Split([ids[i] for i in idx], labels[idx], [images[i] for i in idx],
                        {c: [values[i] for i in idx] for c, values in metadata.items()}) for name, idx in parts.items()}


def metadata_columns(table: pd.DataFrame, columns: Sequence[str]) -> dict[str, list[str]]:
    """Per-sample metadata of `table`'s rows as text, for the columns it has: blanks are "", whole numbers lose ".0"."""

    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    return {c: [text(v) for v in table[c].tolist()] for c in columns if c in table.columns}


def choice(value: Any, option: str, choices: Sequence[str]) -> str:
    """A dataset option restricted to `choices`, or a clear error listing them."""
    text = str(value)
    if text not in choices:
        raise MedfmError(f"--opt {option}={text} is not one of {', '.join(choices)}")
    return text


def as_int(value: Any, option: str) -> int:
    """A whole-number dataset option (from --opt it arrives as text), or a clear error."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MedfmError(f"--opt {option}={value} must be a whole number") from None
