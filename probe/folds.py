"""`probe run --folds K`: K-fold cross-validation on one cache, for datasets too small for one fixed test split.

The labelled rows of the cache's train and test splits are pooled and cut into K folds, stratified by class
(single-label tasks) and grouped by a metadata column when the data has one (a patient column: a patient's images
never sit on both sides). Fold i trains on the other folds and is scored on fold i; the cache's validation split
stays the validation set of every fold, so choosing a head's epoch or its C never sees a fold's test rows. The
assignment depends on the sample ids and the fold seed alone (not on the row order of the file), so every backbone's
cache of the same data gets the same folds and their runs are compared on the same test rows fold by fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from cache.store import CacheReader
from common.errors import MedfmError
from report.subgroups import find_column

POOLED = ("train", "test")  # the splits whose rows the folds share out; validation stays as it is
FOLD_SEED = 0
GROUP_COLUMNS = ("patient", "subject", "group")  # metadata columns taken as groups when --fold-groups is not given


@dataclass(frozen=True)
class FoldRows:
    """Which file rows of which split make up a fold's train and test sets, in serving order, with their ids."""

    train: dict[str, np.ndarray]  # cache split -> file rows
    test: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]  # "train" / "test" -> sample ids, in the order of the rows above


def check_folds(folds: int, fold: int | None = None) -> None:
    if folds < 2:
        raise MedfmError(f"--folds must be at least 2 (K train/test splits), got {folds}")
    if fold is not None and not 0 <= fold < folds:
        raise MedfmError(f"fold {fold} does not exist among {folds} folds (0..{folds - 1})")


def group_column(reader: CacheReader, wanted: str | None) -> str | None:
    """The metadata column that groups rows (`wanted`, or a patient-like column the cache stores), or None."""
    available = sorted(set(reader.metadata("train")) & set(reader.metadata("test"))) if set(POOLED) <= set(reader.splits) else []
    if wanted is not None:
        column = find_column(available, wanted)
        if column is None:
            raise MedfmError(f"--fold-groups {wanted}: the cache {reader.path.name} stores no such metadata column"
                             f" (it has: {', '.join(available) or 'none'})")
        return column
    return next((c for name in GROUP_COLUMNS if (c := find_column(available, name)) is not None), None)


def fold_rows(reader: CacheReader, folds: int, fold: int, groups: str | None = None) -> FoldRows:
    """Fold `fold` of `folds` over the pooled train and test rows of `reader` (`groups`: a metadata column or None)."""
    check_folds(folds, fold)
    missing = [s for s in (*POOLED, "val") if s not in reader.splits]
    if missing:
        raise MedfmError(f"--folds needs a cache with train, val and test splits; {reader.path.name} lacks {', '.join(missing)}")
    splits = np.concatenate([np.full(len(reader.ids(s)), s) for s in POOLED])
    rows = np.concatenate([np.flatnonzero(reader.valid(s)) for s in POOLED])
    ids = np.concatenate([reader.ids(s) for s in POOLED])
    labels = np.concatenate([reader.labels(s) for s in POOLED])
    group = np.concatenate([reader.metadata(s)[groups] for s in POOLED]) if groups else None
    order = np.argsort(ids, kind="stable")  # the folds depend on the ids, not on where rows sit in the file
    splits, rows, ids, labels = splits[order], rows[order], ids[order], labels[order]
    group = group[order] if group is not None else None
    train, test = _split(ids, labels, group, folds, fold, reader.task.kind == "multilabel", reader.task.class_names)
    train_parts, test_parts = _by_split(splits, rows, train), _by_split(splits, rows, test)
    return FoldRows(train={s: rows[p] for s, p in train_parts.items()}, test={s: rows[p] for s, p in test_parts.items()},
                    ids={"train": np.concatenate([ids[p] for p in train_parts.values()]),
                         "test": np.concatenate([ids[p] for p in test_parts.values()])})

def _split(ids: np.ndarray, labels: np.ndarray, group: np.ndarray | None, folds: int, fold: int, multilabel: bool,
           class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of fold `fold`'s train and test rows among the pooled rows (scikit-learn's K-fold splitters)."""
    if len(ids) < folds:
        raise MedfmError(f"--folds {folds}: the cache has only {len(ids)} labelled train and test rows; lower --folds")
    if not multilabel:
        values, counts = np.unique(labels, return_counts=True)
        small = [(class_names[v] if v < len(class_names) else str(v), n) for v, n in zip(values.tolist(), counts.tolist(), strict=True) if n < folds]
        if small:
            name, n = small[0]
            raise MedfmError(f"--folds {folds}: class '{name}' has only {n} labelled train and test rows, fewer than the folds; "
                             "lower --folds")
    if group is not None and len(np.unique(group)) < folds:
        raise MedfmError(f"--folds {folds}: the rows belong to only {len(np.unique(group))} groups; lower --folds or give "
                         "--fold-groups none")
    if multilabel:
        splitter = GroupKFold(folds, shuffle=True, random_state=FOLD_SEED) if group is not None else KFold(folds, shuffle=True, random_state=FOLD_SEED)
    else:
        splitter = (StratifiedGroupKFold(folds, shuffle=True, random_state=FOLD_SEED) if group is not None
                    else StratifiedKFold(folds, shuffle=True, random_state=FOLD_SEED))
    target = np.zeros(len(ids)) if multilabel else labels
    train, test = list(splitter.split(np.zeros((len(ids), 1)), target, group))[fold]
    return train, test


def _by_split(splits: np.ndarray, rows: np.ndarray, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """The chosen pooled positions per cache split (train first), each in file-row order: the order they are served."""
    parts = {s: chosen[splits[chosen] == s] for s in POOLED}
    return {s: p[np.argsort(rows[p], kind="stable")] for s, p in parts.items()}
