"""The names in the backbone and dataset registries, known without building or importing anything heavy.

The command lines check `--backbone` and `--dataset` against these before torch is imported, so a typo
(`extract run --backbone sam2`) is one line in a fraction of a second. `tests/extract/test_cli.py` checks that
they equal the registries (`extract.backbones`, `extract.datasets`); a new entry goes in both.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.errors import MedfmError
from common.registry import unknown

BACKBONES = ("deit", "dino", "dinov2", "resnet152", "blip", "openclip", "sam", "seem")
TEXT_TOWERS = ("openclip",)  # backbones with a text tower of their own: `extract zeroshot`
DATASETS = ("aptos2019", "chexpert", "ddsm", "cbis-ddsm", "demo", "imagefolder", "csv", "ham10000", "idrid", "isic2019",
            "medmnist", "messidor2", "chestxray14")


def check_backbone(name: str) -> None:
    """An unknown backbone is the registry's own error (`extract.backbones.get_spec`), said without loading it."""
    names = _loaded("extract.backbones", "list_backbones") or BACKBONES
    if name not in names:
        raise unknown("backbone", name, names, "extract backbones")


def check_text_tower(name: str) -> None:
    """A backbone without a text tower cannot embed class prompts (`extract zeroshot`): one line."""
    check_backbone(name)
    if name not in TEXT_TOWERS:
        raise MedfmError(f"{name} has no text tower: zero-shot needs a CLIP backbone ({', '.join(TEXT_TOWERS)})")


ROOTLESS = ("demo",)  # generated in memory; every other dataset reads --root


def check_root(dataset: str, root: Path | None) -> None:
    """A missing or wrong --root is one line before torch loads (the dataset module says the same, later, in detail)."""
    if root is None and dataset not in ROOTLESS:
        raise MedfmError(f"dataset '{dataset}' needs --root PATH (`extract datasets` shows the layout it expects there)")
    if root is not None and not Path(root).expanduser().exists():
        raise MedfmError(f"--root {root} does not exist; dataset '{dataset}' reads its files from there")


def check_dataset(name: str) -> None:
    """An unknown dataset is the registry's own error (`extract.datasets.get_dataset`), said without loading it."""
    names = _loaded("extract.datasets", "list_datasets") or DATASETS
    if name not in names:
        raise unknown("dataset", name, names, "extract datasets")


def _loaded(module: str, listing: str) -> tuple[str, ...]:
    """The names of a registry already imported in this process (entries registered at run time included), else ()."""
    registry = sys.modules.get(module)
    return tuple(entry.name for entry in getattr(registry, listing)()) if registry is not None else ()
