"""Which labelled train rows a head sees (`probe curve`'s label-efficiency subsets): drawn per class, seeded, nested."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache.schema import Task
from cache.store import CacheReader
from common.errors import MedfmError
from probe.data import check_trainable

KINDS = ("fraction", "shots")


@dataclass(frozen=True)
class Subset:
    """Which labelled train rows a head sees: `amount` of each class, a fraction in (0, 1] or a number of rows (shots),
    as drawn for `repeat` from `seed`."""

    kind: str  # fraction | shots
    amount: float | int
    repeat: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MedfmError(f"a train subset is a fraction or shots, not '{self.kind}'")
        amount = float(self.amount) if self.kind == "fraction" else int(self.amount)
        object.__setattr__(self, "amount", amount)
        if self.kind == "fraction" and not 0 < amount <= 1:
            raise MedfmError(f"--fractions must lie in (0, 1], got {self.amount:g}")
        if self.kind == "shots" and amount < 1:
            raise MedfmError(f"--shots must be at least 1 row per class, got {self.amount}")

    def count(self, rows: int) -> int:
        """How many of a class's `rows` the subset takes: the rounded fraction (at least one), or the shots."""
        if self.kind == "shots":
            return int(self.amount)
        return min(rows, max(1, math.floor(self.amount * rows + 0.5))) if rows else 0


def draw(ids: Sequence[str], labels: np.ndarray, subset: Subset, task: Task) -> np.ndarray:
    """Positions (sorted) in `ids` of the subset's rows: per class (all rows as one group for multilabel tasks), the
    `subset.count` rows of lowest rank sha256(seed, repeat, id). Shots beyond a class's size are one line."""
    ids = np.asarray(ids, dtype=str)
    ranks = np.array([int.from_bytes(hashlib.sha256(f"{subset.seed}/{subset.repeat}/{i}".encode()).digest()[:8], "big") for i in ids],
                     dtype=np.uint64)
    if task.kind == "multilabel":
        if subset.kind == "shots":
            raise MedfmError("--shots counts rows per class, which a multilabel task does not have; use --fractions")
        groups = {"all rows": np.arange(len(ids))}
    else:
        y = np.asarray(labels).astype(np.int64)
        groups = {task.class_names[c] if c < len(task.class_names) else str(c): np.flatnonzero(y == c) for c in np.unique(y).tolist()}
    chosen = []
    for name, members in groups.items():
        take = subset.count(len(members))
        if take > len(members):
            raise MedfmError(f"--shots {subset.amount}: class '{name}' has only {len(members)} labelled train rows; lower --shots")
        order = members[np.lexsort((ids[members], ranks[members]))]  # by rank, ties by id: independent of the row order
        chosen.append(order[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def subset_rows(reader: CacheReader, subset: Subset) -> np.ndarray:
    """The file rows of the cache's train split that `subset` selects (`FeatureSource(rows=...)` serves only those)."""
    check_trainable(reader)
    return np.flatnonzero(reader.valid("train"))[draw(reader.ids("train"), reader.labels("train"), subset, reader.task)]
