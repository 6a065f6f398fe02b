"""Split rules: the study's seeded hold-out, stratified and patient-grouped splits, and saved manifests.

Every rule returns index arrays into the dataset's row list, keyed `train`, `val`, `test`; a dataset
module turns them into `Split`s. A manifest (ids per split, as saved beside every cache) reproduces a
split exactly, whatever rule made it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import MedfmError

SPLIT_NAMES = ("train", "val", "test")
STUDY_SEED = 42


def study_holdout(n: int, holdout: float, seed: int = STUDY_SEED) -> dict[str, np.ndarray]:
    """The study's split: shuffle `range(n)` with `random.Random(seed)`, hold out the first `int(n * holdout)`.

    The held-out part is halved, first half validation, second half test; every part keeps the
    shuffled order. APTOS2019 (n=3662, 0.3) gives 2564/549/549; ISIC2019 (n=25331, 0.2) 20265/2533/2533.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(n * holdout)
    held, train = order[:cut], order[cut:]
    half = int(len(held) / 2)
    return {"train": np.array(train, dtype=np.int64), "val": np.array(held[:half], dtype=np.int64),
            "test": np.array(held[half:], dtype=np.int64)}


def stratified_split(
    ids: Sequence[str], labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> dict[str, np.ndarray]:
    """Seeded train/val/test index arrays, stratified on the label when every class has enough members."""
    from sklearn.model_selection import train_test_split  # scikit-learn takes a second to import: only when splitting

    index = np.arange(len(ids))
    strat = labels if labels.ndim == 1 and np.bincount(labels).min(initial=len(ids)) >= 3 else None
    train_frac, val_frac, test_frac = fractions
    train, rest = train_test_split(index, train_size=train_frac, random_state=seed, stratify=strat)
    rest_strat = strat[rest] if strat is not None else None
    val, test = train_test_split(rest, test_size=test_frac / (val_frac + test_frac), random_state=seed, stratify=rest_strat)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def grouped_holdout(groups: Sequence[str], holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held-out) index arrays; every group (patient) lands wholly on one side."""
    groups = np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise MedfmError(f"a patient-grouped split needs at least 2 patients per part; found {len(np.unique(groups))}")
    from sklearn.model_selection import GroupShuffleSplit  # scikit-learn takes a second to import: only when splitting

    kept, held = next(GroupShuffleSplit(1, test_size=holdout, random_state=seed).split(groups, groups=groups))
    return np.sort(kept), np.sort(held)


def grouped_split(groups: Sequence[str], fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Seeded train/val/test index arrays that keep every group (patient) inside one split.

    Fractions count groups, not rows, and the split is not stratified: a patient's images never leak
    across splits, which matters more for medical data than exact class balance.
    """
    groups = np.asarray(groups)
    _, val_frac, test_frac = fractions
    held = round(val_frac + test_frac, 9)  # GroupShuffleSplit rounds counts up, so 0.1 + 0.2 = 0.30000000000000004 would take one more
    train, rest = grouped_holdout(groups, held, seed)
    val, test = grouped_holdout(groups[rest], test_frac / (val_frac + test_frac), seed)
    return {"train": train, "val": rest[val], "test": rest[test]}


def read_manifest(path: Path) -> dict[str, list[str]]:
    """A saved split (`<cache>.splits.json`): {split: [ids]}, checked for shape."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MedfmError(f"--manifest {path} does not exist; pass the <cache>.splits.json saved beside a cache")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedfmError(f"--manifest {path} is not JSON ({err}); pass the <cache>.splits.json saved beside a cache") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, list) for v in manifest.values()):
        raise MedfmError(f"--manifest {path} must map split names to lists of ids, like {{\"train\": [...], \"val\": [...]}}")
    unknown = sorted(set(manifest) - set(SPLIT_NAMES))
    if unknown:
        raise MedfmError(f"--manifest {path} has split(s) {', '.join(unknown)}; only {', '.join(SPLIT_NAMES)} are allowed")
    return {name: [str(i) for i in manifest[name]] for name in SPLIT_NAMES if name in manifest}
