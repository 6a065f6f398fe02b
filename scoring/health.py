"""Runs that learned nothing: a collapsed head, or a score within noise of chance (the ledger's `collapsed`, `chance`).

- `collapsed`: a single-label run whose test predictions (argmax) are one class for more than `COLLAPSE_SHARE`
  (95 %) of the rows. Multilabel runs predict no single class and are never flagged collapsed.
- `chance`: the test primary metric is not above chance beyond noise: the lower bound of its `LEVEL` (95 %) percentile
  bootstrap interval (`scoring.bootstrap`, `BOOT` resamples, seed 0) is at or below the metric's chance level
  (`chance_level`), so the interval contains it or lies below it. Chance levels: accuracy, the majority-class rate of the
  test labels (what always predicting the commonest class scores; 1/C would call a head that learned only the prior
  better than chance); macro recall, 1/C over the classes present (any constant or label-blind prediction); quadratic
  kappa, 0; ROC-AUC and mean ROC-AUC, 0.5. A metric undefined on the test split (NaN) is not flagged by this rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache.schema import Task
from scoring.bootstrap import Interval, interval, resample_each

COLLAPSE_SHARE = 0.95
LEVEL, BOOT = 95, 1000


@dataclass(frozen=True)
class Health:
    collapsed: bool
    chance: bool
    message: str  # one line naming what was flagged; "" when nothing was


def chance_level(metric: str, labels: np.ndarray) -> float:
    """What the metric scores on these labels without learning anything (see the module docstring)."""
    if metric == "accuracy":
        return float(np.bincount(np.asarray(labels, dtype=np.int64)).max() / len(labels))
    if metric == "macro_recall":
        return 1.0 / len(np.unique(labels))
    if metric == "quadratic_kappa":
        return 0.0
    return 0.5  # roc_auc, mean_roc_auc


def check_run(task: Task, labels: np.ndarray, logits: np.ndarray) -> Health:
    """Whether the test predictions of a run collapsed to one class, or its primary metric is within noise of chance."""
    return check_runs(task, labels, [logits])[0]


def check_runs(task: Task, labels: np.ndarray, runs: Sequence[np.ndarray]) -> list[Health]:
    """`check_run` of several runs on the same test rows (a sweep's heads), scored on resamples drawn once for all."""
    metric, level = task.primary_metric, chance_level(task.primary_metric, labels)
    values = resample_each(metric, labels, [np.asarray(r, dtype=np.float64) for r in runs], boot=BOOT, seed=0)
    return [_health(task, logits, metric, level, interval(v, LEVEL)) for logits, v in zip(runs, values, strict=True)]


def _health(task: Task, logits: np.ndarray, metric: str, level: float, found: Interval) -> Health:
    notes = []
    collapsed = False
    if task.kind != "multilabel" and len(logits):
        counts = np.bincount(np.asarray(logits).argmax(1), minlength=np.asarray(logits).shape[1])
        share = counts.max() / len(logits)
        collapsed = bool(share > COLLAPSE_SHARE)
        if collapsed:
            name = task.class_names[int(counts.argmax())] if counts.argmax() < len(task.class_names) else str(counts.argmax())
            notes.append(f"collapsed: {share:.0%} of the test predictions are '{name}'")
    chance = bool(np.isfinite(found.low) and found.low <= level)
    if chance:
        notes.append(f"chance: test {metric} is not above its chance level {level:.4f} beyond noise (its {LEVEL}% bootstrap "
                     f"interval is [{found.low:.4f}, {found.high:.4f}])")
    return Health(collapsed, chance, "; ".join(notes))
