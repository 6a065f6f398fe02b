"""The default linear probe (`--solver lbfgs`, `probe.solvers`): a logistic regression on standardized features, solved
to convergence with L-BFGS for each C of a grid, C chosen on validation, as DINOv2's log_regression evaluation and
CLIP_benchmark's linear probe do.

For each C, in increasing order and warm-started from the previous C's solution (the first from zero), it minimises
scikit-learn's objective, C x the summed train loss + ||W||^2 / 2 (no penalty on the bias), divided by C x n (the same
minimiser, with gradients of order one): the mean loss over the n train rows + ||W||^2 / (2 C n) (`objective`).
The loss is the cross-entropy of the softmax; for multilabel tasks the BCE of each label, NaN labels masked, summed
over the labels (each label its own logistic regression, one C for all). Binary tasks keep their two softmax logits
(the study's head): two weight vectors penalised as scikit-learn penalises their difference at 2C.

The train rows of the feature are loaded once (pooled features are small: rows x dim x 4 bytes), standardized with the
train mean and std (`probe.train.feature_stats`, what --standardize uses) exactly as the head standardizes them, on the
run's device. The solve is torch's L-BFGS, full batch, strong Wolfe line search, until the largest entry of the
objective's gradient is below `TOLERANCE` (scikit-learn's default stops at 1e-4) or `MAX_ITER` iterations. The
weights, the loss and L-BFGS run in float64; the two matrix products with the features run in float32, the features'
own precision, which costs half the memory and about half the time of float64 on a CPU and reaches the same
objective (tests/probe/test_logreg.py compares it with scikit-learn's).

C is chosen by the validation primary metric (`training.recipe.improves`: strictly higher wins, so the smaller C wins a
tie). The head is a `LinearHead` whose shift and scale buffers hold the standardization, so `probe eval` and the stored
head use it as any linear head; validation and test are scored through `probe.train.predict`, the loop's own path,
the test split once, in fp32.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cache.schema import Task
from probe.config import FitResult, TrainConfig
from probe.data import FeatureSource
from probe.stack import stack_heads
from probe.train import feature_stats, label_tensor, make_head, per_head_loss, predict
from scoring.metrics import MaskedBCEWithLogits, compute_metrics, loss_fn, primary_score
from training.heads import LinearHead
from training.recipe import improves

if TYPE_CHECKING:
    from rich.progress import Progress

TOLERANCE = 1e-8  # on the largest entry of the objective's gradient
MAX_ITER = 1000  # L-BFGS iterations per C; a C that reaches it is recorded as not converged
HISTORY = 20  # L-BFGS memory (correction pairs)


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, c: float) -> torch.Tensor:
    """scikit-learn's L2 logistic regression objective over C x n: the mean train loss + ||W||^2 / (2 C n). `y` holds
    class indices (softmax cross-entropy) or float labels, NaN unknown (per-label BCE over the known ones, summed).
    The product with `x` runs in x's precision, the rest in the weights'."""
    logits = (x @ weight.to(x.dtype).T).to(weight.dtype) + bias
    if y.is_floating_point():
        loss = MaskedBCEWithLogits(reduction="none")(logits, y).sum() / len(x)
    else:
        loss = F.cross_entropy(logits, y)
    return loss + weight.square().sum() / (2 * c * len(x))


def solve(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, c: float) -> tuple[int, int]:
    """Minimise `objective` over `weight` and `bias` in place, from their current values: (iterations, evaluations)."""
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITER, tolerance_grad=TOLERANCE, tolerance_change=1e-12,
                                  history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(x, y, weight, bias, c)
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    return int(state["n_iter"]), int(state["func_evals"])


def fit_logreg(config: TrainConfig, source: FeatureSource, task: Task, device: torch.device, progress: Progress | None = None) -> FitResult:
    """Fit the linear head for each C of `config.c_grid`, keep the best on validation, score the test split once with it."""
    start = time.perf_counter()
    head = make_head(config, source.row_shape, task.num_outputs)
    if not isinstance(head, LinearHead):
        raise ValueError(f"the lbfgs solver fits a linear head, not {config.head}")
    head.standardize(*feature_stats(source))
    model = stack_heads([head]).to(device)
    x, y = _train_rows(model, source, task, device)
    weight = torch.zeros(task.num_outputs, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(task.num_outputs, dtype=torch.float64, device=device, requires_grad=True)
    criterion = loss_fn(task, reduction="none")
    metric, grid = task.primary_metric, sorted(config.c_grid)
    bar = progress.add_task(f"logistic regression (L-BFGS) over {len(grid)} C values", total=len(grid)) if progress else None
    history, best = [], None
    for i, c in enumerate(grid, 1):
        iterations, evaluations = solve(x, y, weight, bias, c)
        with torch.no_grad():
            train_loss = per_head_loss(criterion, ((x @ weight.float().T).double() + bias)[None], y)
            model.load_head_state(0, {"linear.weight": weight, "linear.bias": bias, "shift": model.shift[0], "scale": model.scale[0]})
        val_logits, val_labels = predict(model, source, "val", task, device, None)
        val_loss = per_head_loss(criterion, torch.from_numpy(val_logits), label_tensor(val_labels, task, torch.device("cpu")))
        score = primary_score(task, val_labels, val_logits[0])
        history.append({"epoch": i, "C": c, "train_loss": float(train_loss[0]), "val_loss": float(val_loss[0]), f"val_{metric}": score,
                        "iterations": iterations, "evaluations": evaluations, "converged": iterations < MAX_ITER,
                        "seconds": round(time.perf_counter() - start, 3)})
        if improves(score, None if best is None else best["score"], config.protocol):
            best = {"epoch": i, "C": c, "score": score, "val_logits": val_logits[0], "state": model.head_state(0)}
        if progress is not None:
            progress.advance(bar)
    assert best is not None
    train_seconds = time.perf_counter() - start

    model.load_head_state(0, best["state"])
    test_logits, test_labels = predict(model, source, "test", task, device, None)  # fp32, as every test split
    extra = {"C": best["C"], "C_grid": grid, "C_at_edge": len(grid) > 1 and best["C"] in (grid[0], grid[-1]),
             "converged": history[best["epoch"] - 1]["converged"]}
    return FitResult(config, best["epoch"], best["score"], compute_metrics(task, val_labels, best["val_logits"]),
                     compute_metrics(task, test_labels, test_logits[0]), history, best["state"], train_seconds, "",
                     {"val": (val_labels, best["val_logits"]), "test": (test_labels, test_logits[0])}, extra,
                     precision="fp32 features, fp64 L-BFGS")


def edge_note(result: FitResult) -> str | None:
    """The console line for a C chosen at the edge of the grid (the best regularisation may lie beyond it) or a C whose
    solve stopped at `MAX_ITER`; None when neither."""
    extra = result.extra
    notes = []
    if extra.get("C_at_edge"):
        notes.append(f"the chosen C = {extra['C']:g} is at the edge of the grid ({extra['C_grid'][0]:g}..{extra['C_grid'][-1]:g}): "
                     "the best regularisation may lie beyond it")
    if extra.get("converged") is False:
        notes.append(f"the solve at C = {extra['C']:g} stopped after {MAX_ITER} iterations before converging")
    return "note: " + "; ".join(notes) if notes else None


@torch.no_grad()
def _train_rows(model: torch.nn.Module, source: FeatureSource, task: Task, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every valid train row standardized as the head standardizes it, float32 [N, D], and its labels (class indices,
    or float64 labels with NaN unknown)."""
    xs, ys = [], []
    for batch in source.eval_batches("train"):
        x = torch.from_numpy(np.ascontiguousarray(batch.features)).to(device, torch.float32)
        xs.append((x - model.shift[0]) / model.scale[0])
        ys.append(batch.labels)
    y = label_tensor(np.concatenate(ys), task, device)
    return torch.cat(xs), y.double() if y.is_floating_point() else y
