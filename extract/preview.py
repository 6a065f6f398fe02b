"""`extract preview`: what a backbone is fed, as a picture, before any hour is spent extracting.

A few images of each class (one row per class), decoded as extraction decodes them and passed through the backbone's
eval transform (`input_spec` of its data config, `eval_transform`), then de-normalised for display. A crop that cuts
the finding away, an image read upside down or a resize that smears it shows at a glance; each tile is labelled with
its file's decoded size, and the title with the transform. Without a backbone, the default input policy
(`DataConfig()`: 224 px, ImageNet statistics, bicubic) is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from common.errors import MedfmError
from extract.backbones import DataConfig, create_backbone
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource
from extract.datasets.images import ImageDataset
from extract.inputs import input_spec
from extract.transforms import TransformSpec, eval_transform

TILE_INCHES, LABEL_INCHES, TITLE_INCHES, SIZE_INCHES, DPI = 1.6, 1.4, 0.5, 0.3, 100  # SIZE: the size labels under a row
PAD = 2  # pixels between tiles (make_grid's padding)


@dataclass(frozen=True)
class Preview:
    path: Path
    classes: tuple[str, ...]  # one row each
    per_class: int  # tiles per row
    spec: TransformSpec


def figure_inches(rows: int, per_class: int) -> tuple[float, float]:
    """The montage's size: a label column and `per_class` tiles wide, a title and `rows` rows of tiles (with their
    size labels) high."""
    return LABEL_INCHES + per_class * TILE_INCHES, TITLE_INCHES + rows * (TILE_INCHES + SIZE_INCHES)


def preview(dataset: str, root: Path | None, out: Path, *, backbone: str | None = None, per_class: int = 4,
            dataset_options: dict[str, Any] | None = None) -> Preview:
    """Write the montage of `dataset`'s first `per_class` images of each class (splits in order) to `out` (PNG)."""
    if per_class < 1:
        raise MedfmError(f"--per-class must be at least 1, got {per_class}")
    source = get_dataset(dataset, root, **(dataset_options or {}))
    config = create_backbone(backbone, "random").data_config if backbone else DataConfig()  # the data config alone matters
    spec, _ = input_spec(source, config, "model", 3, "model", None)
    rows = [_row(source, spec, picks) for picks in _picks(source, per_class)]
    fig = Figure(figsize=figure_inches(len(rows), per_class), dpi=DPI)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    what = backbone or "the default input policy"
    fig.suptitle(f"{source.name} as {what} sees it\nresize {spec.resize}x{spec.resize} ({spec.interpolation}), "
                 f"centre crop {spec.size}x{spec.size}", fontsize=9)
    for ax, name, (tiles, sizes) in zip(axes, source.task.class_names, rows, strict=True):
        blank = [torch.ones(3, spec.size, spec.size)] * (per_class - len(tiles))  # a class with fewer images
        ax.imshow(make_grid(tiles + blank, nrow=per_class, padding=PAD, pad_value=1.0).permute(1, 2, 0).numpy())
        ax.set_xticks([PAD + (spec.size + PAD) * (k + 0.5) for k in range(len(sizes))], sizes, fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=LABEL_INCHES / width, right=0.99, top=1 - TITLE_INCHES / height, bottom=SIZE_INCHES / height,
                        hspace=SIZE_INCHES / TILE_INCHES)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return Preview(out, source.task.class_names, per_class, spec)


def _picks(source: DatasetSource, per_class: int) -> list[list[tuple[str, int]]]:
    """Per class, its first `per_class` (split, row) over the splits in order (a multilabel row counts for each label)."""
    picks: list[list[tuple[str, int]]] = [[] for _ in source.task.class_names]
    for split, data in source.splits.items():
        for row, label in enumerate(data.labels):
            classes = np.flatnonzero(np.nan_to_num(label) == 1) if source.task.kind == "multilabel" else [int(label)]
            for k in classes:
                if len(picks[k]) < per_class:
                    picks[k].append((split, row))
    return picks


def _row(source: DatasetSource, spec: TransformSpec, picks: list[tuple[str, int]]) -> tuple[list[torch.Tensor], list[str]]:
    """The tiles of one class, de-normalised to [0, 1], and each file's decoded size (width x height)."""
    tiles, sizes = [], []
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (spec.mean, spec.std))
    splits = {split: ImageDataset(source, split, eval_transform(spec), (spec.channels, spec.size, spec.size)) for split in source.splits}
    for split, row in picks:
        data = splits[split]
        try:
            image = data.load(row)
        except Exception as err:  # noqa: BLE001 - any decode failure is one line naming the file
            raise MedfmError(f"cannot read image {data.refs[row]}: {err}") from None
        tiles.append((data.transform(image) * std + mean).clamp(0, 1))
        sizes.append(f"{image.width}x{image.height} px")
    return tiles, sizes
