"""The dataset registry: `get_dataset(name, root, **options)` reads a released layout into splits."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from common.registry import Registry
from extract.datasets.base import DatasetSource, Split, Task


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    task: str  # for `extract datasets`: kind and metric in words
    layout: str  # what `--root` must hold
    build: Callable[..., DatasetSource]  # build(root, **options)
    split: str = ""  # the split rule, in words
    classes: tuple[str, ...] = ()  # class names under the default options: label maps are checked against them


REGISTRY: Registry[DatasetEntry] = Registry("dataset", "extract datasets")


def register(entry: DatasetEntry) -> DatasetEntry:
    return REGISTRY.register(entry.name, entry)


def list_datasets() -> list[DatasetEntry]:
    return REGISTRY.values()


def get_dataset(name: str, root: Path | None = None, **options: Any) -> DatasetSource:
    build = REGISTRY.get(name).build
    params = inspect.signature(build).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p != "root"]
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise MedfmError(f"dataset '{name}' has no option(s) {', '.join(unknown)}; "
                             f"it takes {', '.join(accepted) if accepted else 'no options'}")
    source = build(root, **options)
    return replace(source, label_maps=label_maps_of(name, source.task.class_names))


from extract.datasets import (  # noqa: E402,F401
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
from extract.datasets.label_maps import label_maps_of  # noqa: E402

__all__ = ["DatasetSource", "Split", "Task", "get_dataset", "list_datasets", "register"]
