"""The datasets: `get_dataset(name, root, **options)` reads a released layout into splits (`extract.datasets.registry`)."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from extract.datasets import (  # noqa: F401 - each dataset module registers itself
    aptos,
    chexpert,
    ddsm,
    demo,
    folder,
    ham10000,
    idrid,
    isic,
    medmnist,
    messidor2,
    nih_chestxray14,
)
from extract.datasets.base import DatasetSource, Split, Task
from extract.datasets.frames import DEFAULT_FRAMES, with_frames
from extract.datasets.label_maps import label_maps_of
from extract.datasets.registry import REGISTRY, DatasetEntry, list_datasets, register
from extract.names import check_frames


def get_dataset(name: str, root: Path | None = None, **options: Any) -> DatasetSource:
    """Dataset `name` read from `root`, shaped by its builder's `options`; `frames` (any dataset of image files: which
    frames of multi-frame files are samples, `extract.datasets.frames`) is applied after it."""
    frames = str(options.pop("frames", DEFAULT_FRAMES))
    check_frames(frames)  # before the files are listed
    build = REGISTRY.get(name).build
    params = inspect.signature(build).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p != "root"]
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise MedfmError(f"dataset '{name}' has no option(s) {', '.join(unknown)}; "
                             f"it takes {', '.join(accepted) if accepted else 'no options'}")
    source = build(root, **options)
    return with_frames(replace(source, label_maps=label_maps_of(name, source.task.class_names)), frames)


__all__ = ["REGISTRY", "DatasetEntry", "DatasetSource", "Split", "Task", "get_dataset", "list_datasets", "register"]
