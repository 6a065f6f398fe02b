"""The dataset registry: every dataset module registers its entry (`DatasetEntry`) here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.registry import Registry
from extract.datasets.base import DatasetSource


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
