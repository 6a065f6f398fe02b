"""Calibration of single-label runs: ECE, adaptive ECE, Brier score and NLL, temperature scaling, reliability diagrams.

Computed on the softmax of the stored logits (binary tasks: the two-logit softmax, as every single-label metric):
- `ece`: expected calibration error over `BINS` (15) equal-width bins of the confidence (the max probability), bins
  [i/15, (i+1)/15) with a confidence of exactly 1 in a bin of its own (torchmetrics' binning): sum over bins of
  |accuracy - mean confidence| x rows in bin / rows. Binary tasks use the top-label confidence too (not P(positive)).
- `ece_adaptive`: the same over 15 equal-mass bins (rows sorted by confidence, split into 15 near-equal groups).
- `brier`: mean over rows of sum over classes of (p_c - onehot_c)^2 (binary: over both classes, so twice the
  one-probability Brier score).
- `nll`: mean negative log-likelihood of the true class (cross-entropy of the logits).
All four are lower-is-better, so they are stored with the metrics but are never primary metrics (not in `METRICS`).

Temperature scaling (`probe run --calibrate`): one scalar T > 0 minimising the validation NLL of logits / T (LBFGS on
log T, float64); the test metrics with T applied are stored as `<name>_calibrated`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import log_softmax, softmax

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BINS = 15
NAMES = ("ece", "ece_adaptive", "brier", "nll")
BLUE, VERMILLION = "#0072B2", "#D55E00"  # Okabe-Ito: told apart under the common colour-vision deficiencies


def calibration_metrics(labels: np.ndarray, logits: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """ECE, equal-mass ECE, Brier and NLL of single-label logits [N, C] against class indices [N]."""
    y = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    if not len(y):
        return dict.fromkeys(NAMES, float("nan"))
    probs = softmax(logits, axis=1)
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    equal_width = np.searchsorted(edges, confidence, side="right") - 1  # [lo, hi); exactly 1.0 alone in bin `bins`
    order = np.argsort(confidence, kind="stable")
    equal_mass = np.empty(len(y), dtype=np.int64)
    for b, rows in enumerate(np.array_split(order, min(bins, len(y)))):
        equal_mass[rows] = b
    onehot = np.eye(logits.shape[1])[y]
    return {
        "ece": _binned_gap(equal_width, confidence, correct),
        "ece_adaptive": _binned_gap(equal_mass, confidence, correct),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "nll": float(-log_softmax(logits, axis=1)[np.arange(len(y)), y].mean()),
    }


def _binned_gap(bin_of: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> float:
    """sum over bins of |mean correct - mean confidence| x share of rows in the bin."""
    counts = np.bincount(bin_of)
    filled = counts > 0
    accuracy = np.bincount(bin_of, weights=correct)[filled] / counts[filled]
    mean_conf = np.bincount(bin_of, weights=confidence)[filled] / counts[filled]
    return float((np.abs(accuracy - mean_conf) * counts[filled]).sum() / len(confidence))


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising the NLL of logits / T on these (validation) rows: LBFGS on log T from T = 1."""
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_diagram(path: Path, labels: np.ndarray, logits: np.ndarray, temperature: float | None = None,
                        bins: int = BINS, *, run: str | None = None, dataset: str = "") -> Path:
    """Save `reliability_figure` as a PNG at `path`; the run is named by its folder (`path`'s parent) unless `run` is given."""
    plt = _pyplot()
    fig = reliability_figure(labels, logits, temperature, bins, run=run or Path(path).parent.name, dataset=dataset)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reliability_figure(labels: np.ndarray, logits: np.ndarray, temperature: float | None = None, bins: int = BINS, *,
                       run: str = "", dataset: str = "") -> Figure:
    """Accuracy against confidence per equal-width bin (bars), the diagonal and the ECE, over the rows counted in each bin
    (below); with `temperature`, the calibrated logits' curve too. The title names the run, the dataset and the rows: a
    diagram read alone says what it shows, and a bin's count says how far to trust its bar."""
    plt = _pyplot()
    acc, _, counts = _binned(labels, logits, bins)
    ece = calibration_metrics(labels, logits, bins)["ece"]
    fig, (ax, below) = plt.subplots(2, 1, sharex=True, figsize=(5.5, 6), height_ratios=[3, 1], layout="constrained")
    centers = (np.arange(bins) + 0.5) / bins
    ax.bar(centers, np.nan_to_num(acc), width=1 / bins, edgecolor="black", color=BLUE, alpha=0.8, label=f"test (ECE {ece:.3f})")
    if temperature is not None:
        scaled = np.asarray(logits, dtype=np.float64) / temperature
        acc_t, conf_t, counts_t = _binned(labels, scaled, bins)
        shown = counts_t > 0
        ece_t = calibration_metrics(labels, scaled, bins)["ece"]
        ax.plot(conf_t[shown], acc_t[shown], "s-", color=VERMILLION, label=f"T = {temperature:.2f} (ECE {ece_t:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    where = ", ".join([*([dataset] if dataset else []), f"n = {len(labels)} test rows"])
    ax.set_title(f"reliability: {run}\n{where}" if run else f"reliability\n{where}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    below.bar(centers, counts, width=1 / bins, edgecolor="black", color="#999999")
    for x, count in zip(centers, counts, strict=True):
        if count:
            below.text(x, count, str(count), ha="center", va="bottom", fontsize=6)
    below.set(ylim=(0, max(int(counts.max()), 1) * 1.35), xlabel="confidence (max probability)", ylabel="rows")
    return fig


def _binned(labels: np.ndarray, logits: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin (a confidence of 1 in the last): accuracy, mean confidence (NaN where empty), rows."""
    probs = softmax(np.asarray(logits, dtype=np.float64), axis=1)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)
    bin_of = np.minimum(np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="right") - 1, bins - 1)
    counts = np.bincount(bin_of, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bin_of, weights=correct, minlength=bins) / counts
        conf = np.bincount(bin_of, weights=confidence, minlength=bins) / counts
    return acc, conf, counts


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, loaded when a diagram is drawn, not when a run imports scoring
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
