"""Training heads from cached features with the study's recipe (`training.recipe.STUDY`, docs/protocol.md §5).

Validation every epoch selects each head's best weights (`training.recipe.improves`); the test split is
scored once with them, in fp32 (`training.recipe.precision`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from cache.schema import Task
from common.progress import Pace
from common.runtime import one_torch_thread
from probe.config import FitResult, TrainConfig
from probe.data import Batch, FeatureSource
from probe.stack import stack_heads
from scoring.metrics import compute_metrics, loss_fn, primary_scores
from training.heads import LinearHead, build_head
from training.recipe import STUDY, Precision, improves, precision, selection_rows, warmup_then_constant

ONE_THREAD_PARAMETERS = 1 << 18  # a CPU pass of heads with fewer parameters in all trains on one torch thread


def make_head(config: TrainConfig, row_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """The head for `config`, initialised from `config.seed` alone (the same weights in a sweep or alone)."""
    torch.manual_seed(config.seed)
    return build_head(config.head, row_shape, outputs, protocol=config.protocol, **config.head_options())


def train_head(config: TrainConfig, source: FeatureSource, task: Task, device: torch.device, progress: Progress | None = None) -> FitResult:
    """Train one head from cached features (see `fit`)."""
    head = make_head(config, source.row_shape, task.num_outputs)
    with small_on_one_thread([head], device):
        return fit([head], [config], source, task, device, progress)[0]


def small_on_one_thread(heads: list[nn.Module], device: torch.device) -> AbstractContextManager[None]:
    """Train a small pass of heads on the CPU on one torch thread (fewer than ONE_THREAD_PARAMETERS parameters in all).

    A sweep's linear heads are one stacked layer: 12 heads of 5 classes on 768-d features make [12, 5, 768] tensors,
    past torch's grain for splitting an operation across threads (32,768 elements), where one head's [5, 768] is not.
    So each of a step's few dozen small operations (the update, the clipping) forks and joins the CPU threads, and on
    2 shared cores it waits for the other core: 12 heads took 4-13 s of CPU in-process on 2 threads and 1.0 s on one
    (bench/sweep.py's sweep, under load). A lone linear head's forward does the same on a busy machine: with two other
    processes running, one `probe run` of bench/sweep.py's took 2.9-4.3 s on 2 threads and 0.6-1.0 s on one. Same
    operations, one thread."""
    small = device.type == "cpu" and sum(p.numel() for h in heads for p in h.parameters()) < ONE_THREAD_PARAMETERS
    return one_torch_thread() if small else nullcontext()


def fit(
    heads: list[nn.Module], configs: list[TrainConfig], source: FeatureSource, task: Task,
    device: torch.device, progress: Progress | None = None,
) -> list[FitResult]:
    """Train heads together, one pass over the train split per epoch; each keeps its best-validation weights.

    Each head has its own learning rate, weight decay, gradient clipping and early stopping, so training
    it here gives what training it alone gives. Each epoch scores only the primary metric; every metric
    is computed once, on the best epoch's validation logits and on the test split.
    """
    # --- set-up
    if any(c.solver == "lbfgs" for c in configs):
        raise ValueError("the AdamW loop trains configs of --solver adamw (or auto); lbfgs configs go to probe.logreg.fit_logreg")
    configs = [replace(c, solver="adamw") for c in configs]  # what each result records: the loop's solver
    shared = configs[0]
    if any(c.shared() != shared.shared() for c in configs):
        raise ValueError("heads trained together must share feature, batch size, epochs, warmup, patience, clipping and data seed")
    if any(c.standardize and c.head == "linear" for c in configs):
        mean, std = feature_stats(source)
        for head, c in zip(heads, configs, strict=True):
            if c.standardize and isinstance(head, LinearHead):
                head.standardize(mean, std)
    model = stack_heads(heads).to(device)
    optimizer = model.optimizer([c.lr for c in configs], [c.weight_decay for c in configs])
    warmup = STUDY.warmup_steps(source.steps_per_epoch()) if shared.warmup_steps is None else shared.warmup_steps
    scheduler = warmup_then_constant(optimizer, warmup)
    criterion = loss_fn(task, reduction="none")
    amp = precision(device, protocol=shared.protocol)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.needs_scaler)
    metric = task.primary_metric
    best: list[dict[str, Any] | None] = [None] * len(heads)
    stopped = [False] * len(heads)
    history: list[list[dict[str, Any]]] = [[] for _ in heads]
    steps_per_epoch = max(source.steps_per_epoch(), 1)
    what = f"{len(heads)} {shared.head} head(s)"
    bar = progress.add_task(what, total=shared.epochs * steps_per_epoch) if progress else None
    pace = Pace(progress.console if progress is not None else None, what, shared.epochs * steps_per_epoch)
    start = time.perf_counter()

    # --- loop: train one epoch, validate, keep the best weights per head
    for epoch in range(1, shared.epochs + 1):
        where = f"epoch {epoch}/{shared.epochs}"  # said once per epoch: the step loop stays free of string work
        if progress is not None:
            progress.update(bar, description=f"{what}, {where}")

        def stepped(steps: int, epoch: int = epoch, where: str = where) -> None:
            progress.advance(bar)
            pace.step((epoch - 1) * steps_per_epoch + steps, where)

        train_losses = _train_epoch(model, optimizer, scheduler, scaler, criterion, source, task, device, amp, shared, epoch,
                                    stepped if progress is not None else None)
        val_logits, val_labels = predict(model, source, "val", task, device, amp.dtype)
        val_losses = per_head_loss(criterion, torch.from_numpy(val_logits), label_tensor(val_labels, task, torch.device("cpu")))
        chosen = selection_rows(len(val_labels), shared.data_seed, epoch, shared.protocol)  # the study's: a draw of 64s
        scored = (val_labels, val_logits) if chosen is None else (val_labels[chosen], val_logits[:, chosen])
        scores = primary_scores(task, *scored)  # every head at once: no per-head library overhead
        for k, score in enumerate(scores):
            if stopped[k]:
                continue
            history[k].append({"epoch": epoch, "lr": model.head_lr(optimizer, k), "train_loss": train_losses[k],
                               "val_loss": float(val_losses[k]), f"val_{metric}": score, "seconds": round(time.perf_counter() - start, 3)})
            if improves(score, None if best[k] is None else best[k]["score"], shared.protocol):
                best[k] = {"epoch": epoch, "score": score, "val_logits": val_logits[k], "state": model.head_state(k)}
            elif shared.patience and epoch - best[k]["epoch"] >= shared.patience:
                stopped[k] = True
        if progress is not None:
            progress.update(bar, completed=epoch * steps_per_epoch)
        if all(stopped):
            break
    train_seconds = time.perf_counter() - start

    # --- test, once, with each head's best-validation weights
    for k, b in enumerate(best):
        model.load_head_state(k, b["state"])
    test_logits, test_labels = predict(model, source, "test", task, device, None)  # fp32, as the study
    return [
        FitResult(c, b["epoch"], b["score"], compute_metrics(task, val_labels, b["val_logits"]),
                  compute_metrics(task, test_labels, test_logits[k]), history[k], b["state"], train_seconds,
                  getattr(heads[k], "weights_source", ""), {"val": (val_labels, b["val_logits"]), "test": (test_labels, test_logits[k])},
                  precision=amp.describe())
        for k, (c, b) in enumerate(zip(configs, best, strict=True))
    ]


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, scaler: torch.amp.GradScaler,
                 criterion: nn.Module, source: FeatureSource, task: Task, device: torch.device, amp: Precision, shared: TrainConfig,
                 epoch: int, stepped: Callable[[int], None] | None) -> list[float]:
    """One pass over the train split for every stacked head; each head's mean train loss."""
    model.train()
    loss_sum, steps = torch.zeros(model.num_heads, device=device), 0
    for batch in source.train_batches((shared.data_seed, epoch)):
        x, y = _tensors(batch, task, device)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = model(x)
        losses = per_head_loss(criterion, logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.sum()).backward()
        scaler.unscale_(optimizer)
        if shared.grad_clip:
            model.clip_grad_norm_(shared.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += losses.detach()
        steps += 1
        if stepped is not None:
            stepped(steps)
    return (loss_sum / max(steps, 1)).tolist()


def feature_stats(source: FeatureSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the train features (one pass, float64 sums)."""
    total = squares = None
    rows = 0
    for batch in source.eval_batches("train"):
        x = torch.from_numpy(np.ascontiguousarray(batch.features)).double().flatten(0, -2)
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        rows += len(x)
    mean = total / rows
    return mean.float(), (squares / rows - mean * mean).clamp_min(0).sqrt().float()


@torch.no_grad()
def predict(
    model: nn.Module, source: FeatureSource, split: str, task: Task, device: torch.device, amp: torch.dtype | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [H, N, C] of every valid row of `split` (one pass, under autocast `amp` unless None) and the labels."""
    model.eval()
    logits, labels = [], []
    for batch in source.eval_batches(split):
        x, _ = _tensors(batch, task, device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits.append(model(x).float().cpu())
        labels.append(batch.labels)
    return torch.cat(logits, dim=1).numpy(), np.concatenate(labels)


def _tensors(batch: Batch, task: Task, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(batch.features)).to(device, dtype=torch.float32, non_blocking=True)
    return x, label_tensor(batch.labels, task, device)


def label_tensor(labels: np.ndarray, task: Task, device: torch.device) -> torch.Tensor:
    """Labels as the loss takes them: class indices, or float multilabel targets (NaN: unknown)."""
    dtype = torch.float32 if task.kind == "multilabel" else torch.int64
    return torch.as_tensor(labels, dtype=dtype, device=device)


def per_head_loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of each head [H]; heads' losses are summed for backward, so their gradients stay separate."""
    heads, rows = logits.shape[:2]
    if y.ndim == 2:  # multilabel: masked entries (NaN labels) count in neither sum nor mean
        known = (~torch.isnan(y)).sum().clamp(min=1)
        return criterion(logits, y.expand(heads, -1, -1)).sum(dim=(1, 2)) / known
    return criterion(logits.flatten(0, 1), y.repeat(heads)).view(heads, rows).mean(dim=1)
