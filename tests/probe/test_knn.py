"""The kNN probe (`probe.knn`, `probe run --head knn`): DINO's weighted vote, equal to scikit-learn's, chunked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.neighbors import KNeighborsClassifier

from cache.layout import open_cache
from common.errors import MedfmError
from ledger.store import Ledger
from probe.cli import main
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.knn import TEMPERATURE, block_rows, candidate_ks, fit_knn, neighbours, vote
from probe.run import run_probe
from probe.sweep import Grid, expand
from tests.probe.caches import make_cache
from tests.tiny import BINARY, MULTILABEL, run_main

KNN = TrainConfig(head="knn")


def sklearn_knn(train_x: np.ndarray, train_y: np.ndarray, k: int) -> KNeighborsClassifier:
    """scikit-learn's kNN with DINO's weights: cosine distance d = 1 - sim, weight exp((1 - d) / T)."""
    return KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                                weights=lambda d: np.exp((1 - d) / TEMPERATURE)).fit(train_x, train_y)


def ours(train_x: np.ndarray, train_y: np.ndarray, queries: np.ndarray, k: int, classes: int, block: int = 64) -> np.ndarray:
    train = F.normalize(torch.from_numpy(train_x).double(), dim=1)
    sims, idx = neighbours(F.normalize(torch.from_numpy(queries).double(), dim=1), train, k, block)
    return vote(sims, idx, torch.from_numpy(train_y), k, classes)


@pytest.mark.parametrize("k", [1, 10, 20])
def test_knn_vote_equals_sklearn_cosine_knn_with_dinos_weights(k):
    rng = np.random.default_rng(0)
    classes = 5
    centers = rng.normal(size=(classes, 12))
    train_y = rng.integers(0, classes, 120)
    train_x = (centers[train_y] + rng.normal(size=(120, 12))).astype(np.float32)
    queries = (centers[rng.integers(0, classes, 50)] + rng.normal(size=(50, 12))).astype(np.float32)
    reference = sklearn_knn(train_x, train_y, k)
    expected = reference.predict_proba(queries)
    probs = softmax(ours(train_x, train_y, queries, k, classes), axis=1)
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # the stored logits are the log of sklearn's probabilities
    assert (probs.argmax(1) == reference.predict(queries)).all()
    assert (np.argsort(-probs, axis=1, kind="stable") == np.argsort(-expected, axis=1, kind="stable")).all()


def test_blocks_bound_the_similarities_and_one_row_blocks_change_nothing():
    assert block_rows(1_000_000) == 8  # 8 rows x 1e6 train rows x 8 bytes (float64) <= 64 MiB
    assert block_rows(10**9) == 1 and block_rows(100, block_bytes=1) == 1
    rng = np.random.default_rng(1)
    train_x, queries = rng.normal(size=(80, 6)).astype(np.float32), rng.normal(size=(33, 6)).astype(np.float32)
    train_y = rng.integers(0, 3, 80)
    assert np.array_equal(ours(train_x, train_y, queries, 10, 3, block=1), ours(train_x, train_y, queries, 10, 3, block=1000))


def test_k_is_chosen_on_validation_among_those_the_train_split_allows(tmp_path):
    assert candidate_ks(150) == [10, 20, 100] and candidate_ks(5000) == [10, 20, 100, 200] and candidate_ks(4) == [4]
    path = make_cache(tmp_path / "c.h5", separation=1.0)
    with open_cache(path, None, None) as reader:
        source = FeatureSource(reader, "pooled", 64)
        result = fit_knn(KNN, source, reader.task, torch.device("cpu"))
        tiny = fit_knn(KNN, source, reader.task, torch.device("cpu"), block_bytes=1)  # one query row per block
        x = {s: reader.dataset(s, "pooled")[:] for s in ("train", "val", "test")}
        y = {s: reader.labels(s) for s in ("train", "val", "test")}
    val = {k: (sklearn_knn(x["train"], y["train"], k).predict(x["val"]) == y["val"]).mean() for k in (10, 20, 100)}
    chosen = max(val, key=lambda k: (val[k], -k))  # the best validation accuracy; the smallest k on a tie
    assert result.extra["k"] == chosen and result.val_score == pytest.approx(val[chosen])
    assert [h["k"] for h in result.history] == [10, 20, 100]
    test_pred = sklearn_knn(x["train"], y["train"], chosen).predict(x["test"])
    labels, logits = result.predictions["test"]
    assert np.array_equal(logits.argmax(1), test_pred) and result.test_metrics["accuracy"] == pytest.approx((test_pred == y["test"]).mean())
    for split in ("val", "test"):
        assert np.array_equal(tiny.predictions[split][1], result.predictions[split][1])


def test_probe_run_head_knn_writes_a_frozen_knn_ledger_row(isolated_outputs, monkeypatch):
    path = make_cache(isolated_outputs / "c.h5", task=BINARY)
    code, _, err = run_main(main, ["run", "--head", "knn", "--cache", str(path), "--device", "cpu"], monkeypatch)
    assert code == 0, err
    (row,) = Ledger().rows()
    assert (row.scenario, row.head, row.stage, row.late_best) == ("frozen-knn", "knn", "probe", False)
    metrics = json.loads((isolated_outputs / row.run_dir / "metrics.json").read_text())
    assert metrics["k"] in (10, 20, 100) and metrics["temperature"] == TEMPERATURE
    assert row.test_primary == pytest.approx(metrics["test"]["roc_auc"])


def test_knn_refuses_multilabel_tasks_and_sweeps_in_one_line(isolated_outputs):
    path = make_cache(isolated_outputs / "m.h5", task=MULTILABEL)
    with open_cache(path, None, None) as reader, pytest.raises(MedfmError, match="single-label"):
        run_probe(reader, KNN, device="cpu")
    with open_cache(path, None, None) as reader, pytest.raises(MedfmError, match="nothing to sweep"):
        expand(reader, Grid(heads=("knn",)), KNN)
