"""Stored predictions: every run keeps its validation and test outputs with the sample ids, so intervals, paired
tests and any later metric are computed from them without retraining.

One file per run, `<run_dir>/predictions.npz`, with per split `<split>_ids` [N] (str), `<split>_labels` ([N] int64,
or [N, C] float32 with NaN for unknown multilabel entries) and `<split>_logits` [N, C] float32, in the order of the
split's rows. The ledger's `run_dir` points at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import MedfmError

FILE = "predictions.npz"


@dataclass(frozen=True)
class Predictions:
    """One split's outputs of one run, row i being sample `ids[i]`."""

    ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.labels) == len(self.logits):
            raise ValueError(f"ids, labels and logits disagree on the number of rows: {len(self.ids)}, {len(self.labels)}, {len(self.logits)}")


def save_predictions(run_dir: Path, splits: dict[str, Predictions]) -> Path:
    """Write the splits' predictions into the run folder (atomically: a crash never leaves half a file)."""
    arrays: dict[str, np.ndarray] = {}
    for split, p in splits.items():
        arrays |= {f"{split}_ids": np.asarray(p.ids, dtype=str), f"{split}_labels": np.asarray(p.labels),
                   f"{split}_logits": np.asarray(p.logits, dtype=np.float32)}
    path, tmp = Path(run_dir) / FILE, Path(run_dir) / f".{FILE}.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(path)
    return path


def load_predictions(run_dir: str | Path | None, split: str = "test") -> Predictions:
    """The stored predictions of `split` of the run in `run_dir`, or one clear error when the run kept none."""
    path = Path(run_dir or "") / FILE
    if not path.is_file():
        raise MedfmError(f"run {run_dir} has no stored predictions ({FILE}); runs of medfm before 0.2 kept none: retrain it with --force")
    with np.load(path) as data:
        if f"{split}_ids" not in data:
            raise MedfmError(f"{path} holds no '{split}' predictions; it has {', '.join(sorted({k.rsplit('_', 1)[0] for k in data}))}")
        return Predictions(data[f"{split}_ids"], data[f"{split}_labels"], data[f"{split}_logits"])
