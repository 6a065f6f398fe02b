"""Calibration metrics (`scoring.calibration`) against torchmetrics, torch and the direct formula; temperature scaling;
`probe run --calibrate` and the reliability diagram."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional import calibration_error

from ledger.store import Ledger
from probe.cli import main
from scoring.calibration import calibration_metrics, fit_temperature
from scoring.metrics import compute_metrics
from tests.probe.caches import make_cache
from tests.tiny import BINARY, MULTICLASS, MULTILABEL, run_main


def fixed(n: int = 300, classes: int = 4, scale: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return y, rng.normal(size=(n, classes)) * scale + np.eye(classes)[y] * 1.5


@pytest.mark.parametrize("classes", [2, 4])
def test_ece_nll_and_brier_equal_torchmetrics_torch_and_the_formula(classes):
    y, logits = fixed(classes=classes)
    ours = calibration_metrics(y, logits)
    probs = torch.softmax(torch.from_numpy(logits), dim=1)
    expected_ece = calibration_error(probs, torch.from_numpy(y), task="multiclass", num_classes=classes, n_bins=15, norm="l1")
    assert ours["ece"] == pytest.approx(float(expected_ece), abs=1e-6)
    assert ours["nll"] == pytest.approx(float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y))), abs=1e-6)
    brier = np.mean([sum((probs[i, c].item() - (c == y[i])) ** 2 for c in range(classes)) for i in range(len(y))])
    assert ours["brier"] == pytest.approx(brier, abs=1e-6)


def test_adaptive_ece_uses_equal_mass_bins():
    y = np.array([0, 1, 1, 1])
    logits = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]))  # confidences 0.9, 0.8, 0.7, 0.6
    # two bins of two rows: {0.6, 0.7} both right -> |1 - 0.65|; {0.8, 0.9} one right -> |0.5 - 0.85|
    assert calibration_metrics(y, logits, bins=2)["ece_adaptive"] == pytest.approx((0.35 * 2 + 0.35 * 2) / 4)


def test_compute_metrics_stores_calibration_for_single_label_tasks_only():
    y, logits = fixed(classes=4)
    metrics = compute_metrics(MULTICLASS, y, logits)
    assert {"ece", "ece_adaptive", "brier", "nll"} <= set(metrics)
    assert "ece" not in compute_metrics(MULTICLASS, y, logits, only="accuracy")  # the per-epoch primary score stays cheap
    multilabel = compute_metrics(MULTILABEL, (np.random.default_rng(0).random((20, 3)) < 0.5).astype(np.float32), np.zeros((20, 3)))
    assert "ece" not in multilabel


def test_temperature_scaling_recovers_the_temperature_that_sharpened_the_logits():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 3)) * 2
    y = np.array([rng.choice(3, p=p) for p in torch.softmax(torch.from_numpy(true_logits), 1).numpy()])
    t = fit_temperature(y, true_logits * 3.0)  # overconfident by a factor 3
    assert t == pytest.approx(3.0, rel=0.1)
    before, after = calibration_metrics(y, true_logits * 3.0), calibration_metrics(y, true_logits * 3.0 / t)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]


def test_probe_run_calibrate_stores_t_and_calibrated_metrics_and_draws_the_diagram(isolated_outputs, monkeypatch):
    path = make_cache(isolated_outputs / "c.h5", task=BINARY)
    args = ["run", "--cache", str(path), "--epochs", "3", "--lr", "1e-2", "--device", "cpu", "--calibrate"]
    code, _, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    (row,) = Ledger().rows()
    folder = isolated_outputs / row.run_dir
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["calibration_temperature"] > 0 and (folder / "reliability.png").stat().st_size > 0
    for name in ("ece", "ece_adaptive", "brier", "nll"):
        assert name in metrics["test"] and f"{name}_calibrated" in row.test_metrics
    assert row.test_metrics["nll_calibrated"] == pytest.approx(float(F.cross_entropy(
        torch.from_numpy(np.load(folder / "predictions.npz")["test_logits"]).double() / metrics["calibration_temperature"],
        torch.from_numpy(np.load(folder / "predictions.npz")["test_labels"]))), abs=1e-6)
