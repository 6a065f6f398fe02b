"""Stored predictions: every run keeps its validation and test outputs with the sample ids, so intervals, paired
tests and any later metric are computed from them without retraining.

One file per run, `<run_dir>/predictions.npz`, with per split `<split>_ids` [N] (str), `<split>_labels` ([N] int64,
or [N, C] float32 with NaN for unknown multilabel entries) and `<split>_logits` [N, C] float32, in the order of the
split's rows. The ledger's `run_dir` points at it.
"""

from __future__ import annotations

import zipfile
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
    """The stored predictions of `split` of the run in `run_dir`, or one line saying why there are none: the folder is
    gone, the run kept none, or the file is not what medfm writes (damaged, replaced; nothing pickled is ever loaded)."""
    folder = Path(run_dir or "")
    path = folder / FILE
    if run_dir and not folder.is_dir():
        raise MedfmError(f"the run folder {run_dir} is gone (moved or removed), and with it the run's stored predictions ({FILE}); "
                         "put the folder back where the ledger says, or retrain the run with --force")
    if not path.is_file():
        raise MedfmError(f"run {run_dir} has no stored predictions ({FILE}); runs of medfm before 0.2 kept none: retrain it with --force")
    try:
        with np.load(path) as data:
            if f"{split}_ids" not in data:
                raise MedfmError(f"{path} holds no '{split}' predictions; it has {', '.join(sorted({k.rsplit('_', 1)[0] for k in data}))}")
            return _checked(Predictions(data[f"{split}_ids"], data[f"{split}_labels"], data[f"{split}_logits"]))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = "pickled data, which is never loaded" if "pickle" in str(err) else " ".join(str(err).split()) or type(err).__name__
        raise MedfmError(f"cannot read {path} ({reason}); it is not the ids, labels and logits a run stores: retrain the run with "
                         "--force") from None


def _checked(found: Predictions) -> Predictions:
    """Predictions whose arrays are of the kinds medfm writes (text ids, numeric labels, [N, C] float logits), else ValueError."""
    if found.ids.dtype.kind != "U" or found.labels.dtype.kind not in "iuf" or found.logits.dtype.kind != "f" or found.logits.ndim != 2:
        raise ValueError(f"arrays of the wrong kinds: ids {found.ids.dtype}, labels {found.labels.dtype}, logits {found.logits.dtype} "
                         f"{found.logits.shape}")
    return found
