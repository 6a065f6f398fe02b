"""Task metrics: values match scikit-learn, and undefined metrics are NaN with a warning, never 0.5."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from cache.schema import METRICS, Task
from scoring.metrics import compute_metrics, loss_fn, primary, primary_score, primary_scores
from tests.tiny import BINARY, MULTILABEL

MULTICLASS = Task("multiclass", ("a", "b", "c"), "quadratic_kappa")


def test_multiclass_metrics_match_sklearn_on_argmax():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    logits = np.eye(3)[[0, 1, 1, 2, 1, 2, 2]] * 3.0
    m = compute_metrics(MULTICLASS, y, logits)
    pred = logits.argmax(1)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["macro_recall"] == pytest.approx(np.mean([0.5, 1.0, 2 / 3]))
    assert m["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert 0.5 < m["roc_auc"] <= 1.0
    assert m["warnings"] == []
    assert primary(MULTICLASS, m) == m["quadratic_kappa"]


def test_missing_class_gives_nan_auc_and_a_warning_not_half():
    y = np.array([0, 0, 1, 1])
    m = compute_metrics(MULTICLASS, y, np.random.default_rng(0).normal(size=(4, 3)))
    assert math.isnan(m["roc_auc"])
    assert any("c" in w and "roc_auc" in w for w in m["warnings"])


def test_binary_uses_two_logits_and_scores_roc_auc():
    assert BINARY.num_outputs == 2
    y = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.0, 3.0]])
    m = compute_metrics(BINARY, y, logits)
    assert m["roc_auc"] == 1.0 and m["accuracy"] == 1.0
    single = compute_metrics(BINARY, np.array([1, 1]), logits[:2])
    assert math.isnan(single["roc_auc"]) and single["warnings"]


def test_multilabel_mean_auc_leaves_out_and_names_constant_labels():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    logits = np.array([[3, -3, 0], [-3, 3, 0], [3, 3, 0], [-3, -3, 0]], dtype=np.float32)
    m = compute_metrics(MULTILABEL, y, logits)
    assert m["mean_roc_auc"] == 1.0
    assert math.isnan(m["roc_auc/z"])
    assert any("z" in w for w in m["warnings"])
    assert loss_fn(MULTILABEL).__class__.__name__ == "MaskedBCEWithLogits"
    assert loss_fn(MULTICLASS).__class__.__name__ == "CrossEntropyLoss"


def test_constant_predictions_make_kappa_nan_with_warning():
    m = compute_metrics(MULTICLASS, np.zeros(3, dtype=int), np.tile([5.0, 0.0, 0.0], (3, 1)))
    assert math.isnan(m["quadratic_kappa"])
    assert any("quadratic_kappa" in w for w in m["warnings"])


def test_every_metric_of_the_vocabulary_is_computed_for_its_kind():
    """cache.schema.METRICS is the contract; scoring.metrics must compute each name it lists."""
    examples = {"multiclass": (np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 2, 1]]), "binary": (np.array([0, 1, 1, 0]), np.eye(2)[[0, 1, 0, 0]]),
                "multilabel": (np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float), np.eye(2)[[0, 1, 1, 0]])}
    for kind, names in METRICS.items():
        labels, logits = examples[kind]
        for name in names:
            task = Task(kind, tuple("abc"[: logits.shape[1]]), name)
            assert np.isfinite(primary(task, compute_metrics(task, labels, logits))), (kind, name)


def test_quadratic_kappa_is_logged_for_ordered_classes_only():
    """Kappa's quadratic weights assume the classes are ordered: an ordinal task (kappa its metric) logs it, a nominal
    multiclass task (another metric) does not; a binary task's kappa is plain Cohen's kappa and stays."""
    labels, logits = np.array([0, 1, 2, 0]), np.eye(3)[[0, 1, 2, 1]]
    assert "quadratic_kappa" in compute_metrics(Task("multiclass", tuple("abc"), "quadratic_kappa"), labels, logits)
    nominal = compute_metrics(Task("multiclass", tuple("abc"), "macro_recall"), labels, logits)
    assert "quadratic_kappa" not in nominal and {"accuracy", "macro_recall", "roc_auc"} <= set(nominal)
    assert "quadratic_kappa" in compute_metrics(Task("binary", ("n", "p"), "roc_auc"), np.array([0, 1, 1, 0]), np.eye(2)[[0, 1, 0, 0]])


def test_unknown_multilabel_entries_are_masked_in_loss_and_metrics() -> None:
    """CheXpert's `ignore` policy stores NaN: such entries neither train nor score."""
    import torch

    from scoring.metrics import compute_metrics, loss_fn

    task = Task("multilabel", ("a", "b"))
    labels = np.array([[1.0, np.nan], [0.0, 1.0], [1.0, 0.0], [0.0, np.nan]])
    logits = np.array([[2.0, 50.0], [-2.0, 1.0], [1.0, -1.0], [-1.0, -50.0]])
    metrics = compute_metrics(task, labels, logits)
    assert metrics["roc_auc/a"] == 1.0 and metrics["roc_auc/b"] == 1.0
    loss = loss_fn(task)(torch.tensor(logits), torch.tensor(labels))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, -2.0, 1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert torch.isfinite(loss) and torch.isclose(loss, expected.double())


def test_primary_scores_of_many_heads_are_the_floats_of_primary_score_head_by_head():
    """A sweep scores its heads every epoch with `primary_scores`: the same values, bit for bit, as scikit-learn's."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(4, 300, 5)).astype(np.float32)
    logits[1] = 0.0  # one predicted class: kappa undefined (NaN)
    logits[2] += np.eye(5, dtype=np.float32)[y] * 2
    for metric in ("accuracy", "quadratic_kappa", "roc_auc", "macro_recall"):
        task = Task("multiclass", tuple("abcde"), metric)
        got, want = primary_scores(task, y, logits), [primary_score(task, y, head) for head in logits]
        assert np.array_equal(got, want, equal_nan=True), metric


def test_per_class_scores_and_the_confusion_matrix_are_scikit_learns():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from scoring.metrics import per_class

    labels, logits = np.array([0, 1, 2, 2, 1, 0, 2]), np.eye(3)[[0, 2, 2, 1, 1, 0, 2]]
    got = per_class(Task("multiclass", ("a", "b", "c"), "accuracy"), labels, logits)
    p, r, f, s = precision_recall_fscore_support(labels, logits.argmax(1), labels=[0, 1, 2], zero_division=0)
    assert [got["classes"][n]["recall"] for n in "abc"] == pytest.approx(r) and [got["classes"][n]["support"] for n in "abc"] == s.tolist()
    assert got["confusion_matrix"]["rows_true_columns_predicted"] == confusion_matrix(labels, logits.argmax(1)).tolist()
    assert got["confusion_matrix"]["rows_true_columns_predicted"][2] == [0, 1, 2]  # class c: once taken for b, twice right
    multi = per_class(Task("multilabel", ("x", "y"), "mean_roc_auc"), np.array([[1, np.nan], [0, 1], [1, 0]]),
                      np.array([[3.0, 0.0], [-3.0, 3.0], [-3.0, -3.0]]))
    assert multi["classes"]["x"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert multi["classes"]["y"]["support"] == 1  # the unknown entry left out
