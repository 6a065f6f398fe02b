"""Task metrics with scikit-learn, shared by probe and finetune.

`task` is the `cache.schema.Task` stored in the cache; this module computes every metric of its
vocabulary (`cache.schema.METRICS`). Binary tasks use two logits (softmax, as the study does);
multilabel tasks use one sigmoid logit per label.

A metric that cannot be computed (a class absent from y_true, a constant prediction for kappa) is NaN
and a line in `metrics["warnings"]`: never a quiet 0.5 (docs/architecture.md, "Lessons from peer tools").
Every other value is a float. Single-label tasks also get `ece`, `ece_adaptive`, `brier` and `nll`
(`scoring.calibration`): stored with the metrics, lower is better, never a primary metric.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit, softmax
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)
from torch import nn

from cache.schema import METRICS, Task
from scoring.calibration import calibration_metrics

Metrics = dict[str, Any]  # metric name -> float, plus "warnings" -> list[str]


class MaskedBCEWithLogits(nn.Module):
    """BCE-with-logits over the known labels only: NaN marks a label to ignore (e.g. CheXpert's `ignore` policy)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none") * known
        return loss if self.reduction == "none" else loss.sum() / known.sum().clamp(min=1)


def loss_fn(task: Task, reduction: str = "mean") -> nn.Module:
    """Cross-entropy over classes; masked BCE-with-logits per label for multilabel tasks (labels as floats, NaN unknown)."""
    return MaskedBCEWithLogits(reduction) if task.kind == "multilabel" else nn.CrossEntropyLoss(reduction=reduction)


def compute_metrics(task: Task, labels: np.ndarray, logits: np.ndarray, only: str | None = None) -> Metrics:
    """Every metric of the task kind on one split, or just metric `only` (what training needs each epoch);
    NaN plus a warning where a metric is undefined. Quadratic kappa weighs a confusion by the distance between the
    classes' indices, which means something only for ordered classes: a multiclass task gets it when it is the task's
    own metric (APTOS's grades), never for nominal classes (ISIC's lesion types, your folder's classes)."""
    names = METRICS[task.kind] if only is None else (only,)
    if only is None and task.kind == "multiclass" and task.primary_metric != "quadratic_kappa":
        names = tuple(name for name in names if name != "quadratic_kappa")
    logits = np.asarray(logits, dtype=np.float64)
    problems: list[str] = []
    if task.kind == "multilabel":
        metrics = _multilabel(task, np.asarray(labels), logits, problems)
    else:
        metrics = _single_label(task, np.asarray(labels).astype(np.int64), logits, problems, names)
        if only is None:  # calibration (scoring.calibration): lower is better, stored beside the metrics, never primary
            metrics.update(calibration_metrics(np.asarray(labels).astype(np.int64), logits))
    metrics["warnings"] = problems
    return metrics


def per_class(task: Task, labels: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Each class's precision, recall, F1 and support, and the confusion matrix (rows: true class, columns: predicted),
    scikit-learn's, on the argmax prediction; for a multilabel task each label's, at probability 0.5, over its known
    entries. What a single score hides: which classes a head gets wrong, and as what."""
    logits = np.asarray(logits, dtype=np.float64)
    if task.kind == "multilabel":
        out = {}
        for k, name in enumerate(task.class_names):
            known = ~np.isnan(np.asarray(labels, dtype=np.float64)[:, k])
            y, pred = np.asarray(labels)[known, k].astype(np.int64), (expit(logits[known, k]) >= 0.5).astype(np.int64)
            p, r, f, s = precision_recall_fscore_support(y, pred, labels=[1], zero_division=0)
            out[name] = {"precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0]), "support": int(s[0])}
        return {"classes": out}
    y, pred, classes = np.asarray(labels).astype(np.int64), logits.argmax(axis=1), np.arange(logits.shape[1])
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    names = [task.class_names[c] if c < len(task.class_names) else str(c) for c in classes]
    return {"classes": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                        for i, n in enumerate(names)},
            "confusion_matrix": {"labels": names, "rows_true_columns_predicted": confusion_matrix(y, pred, labels=classes).tolist()}}


def primary(task: Task, metrics: Metrics) -> float:
    """The dataset's primary metric (the study's model-selection and reported score)."""
    return float(metrics[task.primary_metric])


def primary_score(task: Task, labels: np.ndarray, logits: np.ndarray) -> float:
    """The primary metric alone: a fraction of `compute_metrics`' cost, for model selection every epoch."""
    return float(compute_metrics(task, labels, logits, only=task.primary_metric)[task.primary_metric])


def primary_scores(task: Task, labels: np.ndarray, logits: np.ndarray) -> list[float]:
    """`primary_score` of each head's logits [H, N, C] on the same rows: a sweep's model selection every epoch.

    Accuracy and quadratic kappa come from each head's confusion matrix with scikit-learn's own arithmetic (the same
    floats), without its input validation, which costs more than the metric itself; other metrics use `primary_score`."""
    metric = task.primary_metric
    if task.kind == "multilabel" or metric not in ("accuracy", "quadratic_kappa"):
        return [primary_score(task, labels, head) for head in logits]
    y = np.asarray(labels).astype(np.int64)
    classes = logits.shape[-1]
    predictions = softmax(np.asarray(logits, dtype=np.float64), axis=-1).argmax(axis=-1)  # as `_single_label` predicts
    if metric == "accuracy":
        return [float((y == pred).mean()) for pred in predictions]
    return [_quadratic_kappa(np.bincount(y * classes + pred, minlength=classes * classes).reshape(classes, classes))
            for pred in predictions]


def _quadratic_kappa(confusion: np.ndarray) -> float:
    """scikit-learn's `cohen_kappa_score(weights="quadratic")` from its confusion matrix [label, prediction]; NaN where
    undefined (`_kappa` says why when the full metrics are computed)."""
    confusion = confusion.astype(np.float64)
    sum0, sum1 = confusion.sum(axis=0), confusion.sum(axis=1)
    total = sum0.sum()
    if total == 0:
        return float("nan")
    expected = np.outer(sum0, sum1) / total
    weights = np.zeros(confusion.shape, dtype=np.float64) + np.arange(len(confusion))
    weights = (weights - weights.T) ** 2
    denominator = (weights * expected).sum()
    return float("nan") if denominator == 0 else float(1 - (weights * confusion).sum() / denominator)


def _single_label(task: Task, y: np.ndarray, logits: np.ndarray, problems: list[str], names: tuple[str, ...]) -> Metrics:
    classes = np.arange(logits.shape[1])
    probs = softmax(logits, axis=1)
    pred = probs.argmax(axis=1)
    present = np.unique(y)
    missing = [task.class_names[c] if c < len(task.class_names) else str(c) for c in classes if c not in present]
    compute = {
        "accuracy": lambda: float(accuracy_score(y, pred)),
        # Macro recall over the classes present in y_true (balanced accuracy); an absent class has no recall.
        "macro_recall": lambda: float(recall_score(y, pred, labels=present, average="macro", zero_division=0)),
        "roc_auc": lambda: _roc_auc(y, probs, classes, missing, problems),
        "quadratic_kappa": lambda: _kappa(y, pred, classes, problems),
    }
    return {name: compute[name]() for name in names}


def _roc_auc(y: np.ndarray, probs: np.ndarray, classes: np.ndarray, missing: list[str], problems: list[str]) -> float:
    """One-vs-rest macro ROC-AUC (binary: of the positive class); NaN when a class is absent from y_true."""
    if missing:
        problems.append(f"classes absent from y_true ({', '.join(missing)}): macro_recall averages the other classes, roc_auc is NaN")
        return float("nan")
    if len(classes) == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=classes))


def _kappa(y: np.ndarray, pred: np.ndarray, classes: np.ndarray, problems: list[str]) -> float:
    """Quadratic Cohen kappa on argmax; undefined (NaN) when expected agreement leaves nothing to beat."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # sklearn's own undefined-metric warning; ours is in the result
        value = float(cohen_kappa_score(y, pred, labels=classes, weights="quadratic"))
    if not np.isfinite(value):
        problems.append("quadratic_kappa is undefined (labels and predictions leave no disagreement to weigh): NaN")
        return float("nan")
    return value


def _multilabel(task: Task, y: np.ndarray, logits: np.ndarray, problems: list[str]) -> Metrics:
    """Mean over labels of per-label ROC-AUC on the rows where the label is known (not NaN);
    a label with one class among its known rows is left out and named."""
    probs = expit(logits)
    metrics: Metrics = {}
    aucs, skipped = [], []
    for j, name in enumerate(task.class_names):
        known = ~np.isnan(y[:, j].astype(np.float64))
        column = y[known, j]
        if len(np.unique(column)) < 2:
            skipped.append(name)
            metrics[f"roc_auc/{name}"] = float("nan")
            continue
        aucs.append(float(roc_auc_score(column, probs[known, j])))
        metrics[f"roc_auc/{name}"] = aucs[-1]
    if skipped:
        problems.append(f"labels with a single class in y_true ({', '.join(skipped)}): left out of mean_roc_auc")
    metrics["mean_roc_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    return metrics
