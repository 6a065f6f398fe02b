"""Label maps: how a dataset's classes map onto a partner dataset's, for scoring a head trained on the partner.

Each map is a data file, `labelmaps/<dataset>-<partner>.json`:
`{"dataset": ..., "partner": ..., "map": {own class: partner class or null}, "note": "why / source"}`.
Every own class is a key (null says it has no partner class: it is reported, never dropped in silence), and every
non-null value is one of the partner's classes; both are checked against the registry's class names whenever a
dataset is built or listed. `extract run` copies a dataset's maps into its cache's meta (`CacheMeta.label_maps`).
What each map leaves unmapped, and why: docs/transfer.md §3.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from common.errors import MedfmError
from extract.datasets.registry import REGISTRY

LABELMAP_DIR = Path(__file__).with_name("labelmaps")


@dataclass(frozen=True)
class LabelMap:
    """One map file: `dataset`'s classes onto `partner`'s, None where an own class has no partner class."""

    dataset: str
    partner: str
    mapping: dict[str, str | None]
    note: str
    path: Path

    def unmapped(self) -> list[str]:
        """Own classes without a partner class."""
        return [own for own, theirs in self.mapping.items() if theirs is None]

    def unsourced(self) -> list[str]:
        """Partner classes no own class maps onto: a partner head's outputs for them have nothing to be scored against."""
        return [c for c in fixed_classes(self.partner, "partner", self.path) if c not in set(self.mapping.values())]

    def check(self, own_classes: Sequence[str], partner_classes: Sequence[str]) -> None:
        """Every own class is a key and every key an own class; every non-null value is a partner class."""
        problems = []
        if missing := [c for c in own_classes if c not in self.mapping]:
            problems.append(f"lacks own class(es) {', '.join(missing)} (map each to a class of {self.partner} or to null)")
        if extra := [c for c in self.mapping if c not in own_classes]:
            problems.append(f"names class(es) {', '.join(extra)} that {self.dataset} does not have")
        if wrong := sorted({v for v in self.mapping.values() if v is not None and v not in partner_classes}):
            problems.append(f"maps onto {', '.join(wrong)}, not among {self.partner}'s classes ({', '.join(partner_classes)})")
        if problems:
            raise MedfmError(f"label map {self.path}: {'; '.join(problems)}")

    def summary(self) -> str:
        """One line for `extract datasets`: how many classes are mapped, which are not, which partner classes get none."""
        mapped = len(self.mapping) - len(self.unmapped())
        return (f"{self.dataset} -> {self.partner}: {mapped}/{len(self.mapping)} classes mapped"
                + (f"; unmapped: {', '.join(self.unmapped())}" if self.unmapped() else "")
                + (f"; {self.partner} classes without a source: {', '.join(self.unsourced())}" if self.unsourced() else ""))


def read_label_map(path: Path) -> LabelMap:
    """One map file, checked for shape (not yet against the datasets' classes)."""
    try:
        data = json.loads(path.read_text())
        classes = data["map"]
        ok = (isinstance(data["dataset"], str) and isinstance(data["partner"], str) and isinstance(classes, dict)
              and all(isinstance(v, str) or v is None for v in classes.values()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:  # TypeError: not an object
        raise MedfmError(f"label map {path} cannot be read ({type(err).__name__}: {err}); it must be JSON with "
                         '"dataset", "partner", "map" and "note"') from None
    if not ok:
        raise MedfmError(f'label map {path}: "dataset" and "partner" must be names and "map" must map class names '
                         "to a partner class name or null")
    return LabelMap(data["dataset"], data["partner"], dict(classes), str(data.get("note", "")), path)


@cache
def read_label_maps(folder: Path = LABELMAP_DIR) -> tuple[LabelMap, ...]:
    """Every map file in `folder`, sorted by file name; one (dataset, partner) pair per file."""
    maps = tuple(read_label_map(p) for p in sorted(folder.glob("*.json")))
    pairs = [(m.dataset, m.partner) for m in maps]
    twice = sorted({f"{d} -> {p}" for d, p in pairs if pairs.count((d, p)) > 1})
    if twice:
        raise MedfmError(f"{folder} holds more than one label map for {', '.join(twice)}; keep one file per pair")
    return maps


def fixed_classes(dataset: str, role: str, path: Path) -> tuple[str, ...]:
    """The registry's class names of `dataset` (under its default options), which a map is checked against."""
    if dataset not in REGISTRY.entries:
        raise MedfmError(f"label map {path}: {role} '{dataset}' is not a registered dataset (see `extract datasets`)")
    classes = REGISTRY.get(dataset).classes
    if not classes:
        raise MedfmError(f"label map {path}: {role} '{dataset}' declares no fixed class names (DatasetEntry.classes)")
    return classes


def maps_of(dataset: str, own_classes: Sequence[str] | None = None, folder: Path = LABELMAP_DIR) -> list[LabelMap]:
    """`dataset`'s maps, each checked against its classes (`own_classes`, else the registry's) and its partner's."""
    found = [m for m in read_label_maps(folder) if m.dataset == dataset]
    for m in found:
        m.check(own_classes if own_classes is not None else fixed_classes(dataset, "dataset", m.path),
                fixed_classes(m.partner, "partner", m.path))
    return found


def label_maps_of(dataset: str, own_classes: Sequence[str], folder: Path = LABELMAP_DIR) -> dict[str, dict[str, str | None]]:
    """{partner: {own class: partner class or None}} for a built dataset: what `DatasetSource.label_maps` holds."""
    return {m.partner: dict(m.mapping) for m in maps_of(dataset, own_classes, folder)}
