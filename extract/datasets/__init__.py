"""The dataset registry: `get_dataset(name, root, **options)` reads a released layout into splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache.errors import MedfmError
from extract.datasets.base import DatasetSource, Split, Task


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    description: str
    task: str  # for `extract datasets`: kind and metric in words
    layout: str  # what `--root` must hold
    build: Callable[..., DatasetSource]  # build(root, **options)


_REGISTRY: dict[str, DatasetEntry] = {}


def register(entry: DatasetEntry) -> DatasetEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"dataset {entry.name} registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_datasets() -> list[DatasetEntry]:
    return list(_REGISTRY.values())


def get_dataset(name: str, root: Path | None = None, **options: Any) -> DatasetSource:
    if name not in _REGISTRY:
        raise MedfmError(f"unknown dataset '{name}'; choose one of: {', '.join(_REGISTRY)} (see `extract datasets`)")
    return _REGISTRY[name].build(root, **options)


from extract.datasets import demo, folder  # noqa: E402,F401

__all__ = ["DatasetSource", "Split", "Task", "get_dataset", "list_datasets", "register"]
