"""What every dataset is: ids, images and labels per split, plus the `Task` the probes need.

A dataset module only parses its released layout into a `DatasetSource`; decoding, transforms,
bad-image handling and caching are shared (here and in the runner).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from cache.errors import MedfmError

TASK_KINDS = ("multiclass", "binary", "multilabel")
DEFAULT_METRIC = {"multiclass": "accuracy", "binary": "roc_auc", "multilabel": "mean_roc_auc"}


@dataclass(frozen=True)
class Task:
    """What is predicted and how it is scored; it travels inside the cache to the probes."""

    kind: str  # multiclass | binary | multilabel
    class_names: tuple[str, ...]
    primary_metric: str  # accuracy | quadratic_kappa | macro_recall | roc_auc | mean_roc_auc

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task kind {self.kind} not in {TASK_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Split:
    """One split: ids, labels ([N] int64, or [N, C] float32 for multilabel) and an image reference per id."""

    ids: list[str]
    labels: np.ndarray
    images: Sequence[Any]  # whatever the source's `load_image` takes: usually paths

    def __len__(self) -> int:
        return len(self.ids)


def open_image(ref: Any) -> Image.Image:
    """Decode one image file fully (so a truncated file fails here, not later)."""
    with Image.open(ref) as img:
        img.load()
        return img.copy()


@dataclass
class DatasetSource:
    """A dataset ready for extraction: per-split ids/labels/images, the task, and how to open an image."""

    name: str
    task: Task
    splits: dict[str, Split]
    grayscale: bool = False
    load_image: Callable[[Any], Image.Image] = open_image
    options: dict[str, Any] = field(default_factory=dict)  # the options that shaped it (fingerprinted)

    def manifest(self) -> dict[str, list[str]]:
        """Ids per split, in row order: the split assignment saved beside every cache and run."""
        return {name: list(split.ids) for name, split in self.splits.items()}


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms one split's images; a bad image comes back flagged, never as a crash."""

    def __init__(self, source: DatasetSource, split: str, transform: Callable[[Image.Image], torch.Tensor], shape: tuple[int, int, int]) -> None:
        self.refs = source.splits[split].images
        self.load_image = source.load_image
        self.mode = "L" if shape[0] == 1 else "RGB"
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            image = self.load_image(self.refs[index]).convert(self.mode)
            return self.transform(image), True, ""
        except Exception as err:  # noqa: BLE001 - any decode failure is reported by the runner, with the file
            return torch.zeros(self.shape), False, f"{self.refs[index]}: {type(err).__name__}: {err}"


def stratified_split(
    ids: Sequence[str], labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Seeded train/val/test index arrays, stratified on the label when every class has enough members."""
    index = np.arange(len(ids))
    strat = labels if labels.ndim == 1 and np.bincount(labels).min(initial=len(ids)) >= 3 else None
    train_frac, val_frac, test_frac = fractions
    train, rest = train_test_split(index, train_size=train_frac, random_state=seed, stratify=strat)
    rest_strat = strat[rest] if strat is not None else None
    val, test = train_test_split(rest, test_size=test_frac / (val_frac + test_frac), random_state=seed, stratify=rest_strat)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def require_root(root: Path | None, dataset: str, layout: str) -> Path:
    """The dataset folder, or a clear error saying what belongs there."""
    if root is None:
        raise MedfmError(f"dataset '{dataset}' needs --root PATH, a folder holding {layout}")
    root = Path(root).expanduser()
    if not root.exists():
        raise MedfmError(f"--root {root} does not exist; dataset '{dataset}' expects {layout}")
    return root
