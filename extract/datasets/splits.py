"""Split rules: the study's seeded hold-out, stratified and patient-grouped splits, and saved manifests.

Every rule returns index arrays into the dataset's row list, keyed `train`, `val`, `test`; a dataset
module turns them into `Split`s. A manifest (ids per split, as saved beside every cache) reproduces a
split exactly, whatever rule made it.
"""

from __future__ import annotations

import json
import random
import warnings
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


class SplitWarning(UserWarning):
    """A split made differently than asked (too few images to stratify); the command line prints it as one line."""


def stratified_split(
    ids: Sequence[str], labels: np.ndarray, fractions: tuple[float, float, float], seed: int,
    classes: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded train/val/test index arrays, stratified on the label when every class has enough members.

    Small datasets: each of the two cuts (train | rest, then val | test) is stratified when scikit-learn
    can stratify it, else made at random with a `SplitWarning` saying so (a class with fewer than 3
    images, or fewer images in a part than classes) and naming the `classes` a part lacks; multilabel
    labels are never stratified. A dataset too small for three non-empty parts is refused with
    the number of images it needs. Whenever stratifying works the split is exactly the stratified one,
    so caches and runs of larger datasets keep their manifests.
    """
    from sklearn.model_selection import train_test_split  # scikit-learn takes a second to import: only when splitting

    index = np.arange(len(ids))
    single = labels.ndim == 1
    stratify = single and np.bincount(labels).min(initial=len(ids)) >= 3
    train_frac, val_frac, test_frac = fractions
    random_cuts: list[str] = [] if stratify or not single else ["train", "val+test"]

    def cut(part: np.ndarray, name: str, **size: float) -> tuple[np.ndarray, np.ndarray]:
        if stratify:
            try:
                return train_test_split(part, random_state=seed, stratify=labels[part], **size)
            except ValueError:  # a class with one member in `part`, or fewer rows in a side than classes
                random_cuts.append(name)
        try:
            return train_test_split(part, random_state=seed, **size)
        except ValueError:  # a side would be empty
            need = min_split_size(fractions)
            raise MedfmError(f"{len(ids)} images are too few for a train/val/test split of "
                             f"{'/'.join(f'{f:.0%}' for f in fractions)}: it needs at least {need} images; "
                             "add images, or give the split yourself") from None

    train, rest = cut(index, "train", train_size=train_frac)
    val, test = cut(rest, "val+test", test_size=test_frac / (val_frac + test_frac))
    parts = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    if random_cuts:
        warnings.warn(_unstratified_message(labels, parts, random_cuts, fractions, classes), SplitWarning, stacklevel=2)
    return parts


def min_split_size(fractions: tuple[float, float, float]) -> int:
    """The fewest rows that an unstratified split at `fractions` cuts into three non-empty parts."""
    from sklearn.model_selection import train_test_split

    train_frac, val_frac, test_frac = fractions
    for n in range(3, 1000):
        try:
            _, rest = train_test_split(np.arange(n), train_size=train_frac, random_state=0)
            train_test_split(rest, test_size=test_frac / (val_frac + test_frac), random_state=0)
            return n
        except ValueError:
            continue
    return 1000


def _unstratified_message(labels: np.ndarray, parts: dict[str, np.ndarray], cuts: list[str],
                          fractions: tuple[float, float, float], classes: Sequence[str] | None) -> str:
    counts = np.bincount(labels)
    names = list(classes) if classes is not None and len(classes) >= len(counts) else [str(c) for c in range(len(counts))]
    how = {("train", "val+test"): "the split is random, not stratified",
           ("val+test",): "train is stratified, but val and test are split at random",
           ("train",): "train and the rest are split at random, val and test stratified"}[tuple(cuts)]
    message = (f"{len(labels)} images are too few to stratify the split by label (the smallest class has {counts.min()}; "
               f"about {_per_class_needed(len(counts), fractions)} per class would do), so {how}")
    missing = {name: [names[c] for c in range(len(counts)) if c not in set(labels[idx].tolist())] for name, idx in parts.items()}
    gaps = [f"{name} has no image of {', '.join(lacking)}" for name, lacking in missing.items() if lacking]
    return message + (f"; {'; '.join(gaps)}" if gaps else "")


def _per_class_needed(classes: int, fractions: tuple[float, float, float]) -> int:
    """The fewest images per class with which `classes` balanced classes stratify at `fractions`."""
    from sklearn.model_selection import train_test_split

    train_frac, val_frac, test_frac = fractions
    for k in range(3, 200):
        labels = np.repeat(np.arange(classes), k)
        try:
            _, rest = train_test_split(np.arange(len(labels)), train_size=train_frac, random_state=0, stratify=labels)
            train_test_split(rest, test_size=test_frac / (val_frac + test_frac), random_state=0, stratify=labels[rest])
            return k
        except ValueError:
            continue
    return 200


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


def stratified_group_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> list[np.ndarray]:
    """`folds` seeded folds of row indices that keep every group (lesion, examination) in one fold: the groups are
    dealt into folds stratified by each group's highest label (a lesion's diagnosis, an examination's worst grade).

    For releases without an official split whose images come in groups: HAM10000 (lesions), Messidor-2 (examinations).
    Folding the groups (scikit-learn's StratifiedKFold) rather than the rows (its StratifiedGroupKFold) takes
    milliseconds instead of seconds on HAM10000's 7,470 lesions.
    """
    from sklearn.model_selection import KFold, StratifiedKFold  # scikit-learn takes a second to import: only when splitting

    names, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
    if len(names) < folds:
        raise MedfmError(f"a split into {folds} stratified folds needs at least {folds} groups (lesions, patients or images); "
                         f"found {len(names)}")
    group_label = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(group_label, group_of_row, np.asarray(labels, dtype=np.int64))
    smallest = np.bincount(group_label)[np.unique(group_label)].min()
    if smallest < folds:  # a class in fewer groups than folds cannot reach every fold
        warnings.warn(f"{len(names)} groups are too few to stratify {folds} folds by label (the smallest class has "
                      f"{smallest}; {folds} per class would do), so the folds are made at random", SplitWarning, stacklevel=2)
    fold_of_group = np.empty(len(names), dtype=np.int64)
    splitter = (StratifiedKFold if smallest >= folds else KFold)(folds, shuffle=True, random_state=seed)
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(names)), group_label)):
        fold_of_group[members] = fold
    fold_of_row = fold_of_group[group_of_row]
    return [np.flatnonzero(fold_of_row == fold) for fold in range(folds)]


def stratified_group_split(labels: np.ndarray, groups: Sequence[str], seed: int, folds: int = 10) -> dict[str, np.ndarray]:
    """Train/val/test index arrays from `stratified_group_folds`: the last fold is test, the one before it validation."""
    parts = stratified_group_folds(labels, groups, folds, seed)
    return {"train": np.sort(np.concatenate(parts[:-2])), "val": parts[-2], "test": parts[-1]}


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
