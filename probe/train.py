"""Training heads from cached features with the study's recipe (`probe.recipe.STUDY`, docs/protocol.md §5).

Validation every epoch selects each head's best weights (`probe.recipe.improves`); the test split is
scored once with them, in fp32 (`probe.recipe.precision`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from cache.schema import Task
from probe.data import Batch, FeatureSource
from probe.heads import LinearHead, build_head, get_head
from probe.metrics import Metrics, compute_metrics, loss_fn, primary_scores
from probe.recipe import STUDY, improves, precision, warmup_then_constant
from probe.stack import stack_heads

if TYPE_CHECKING:
    from pathlib import Path

    from torch.utils.tensorboard import SummaryWriter

    from probe.curve import Subset


@dataclass(frozen=True)
class TrainConfig:
    """One head's training settings. Heads trained together in one pass share all but head/lr/wd/seed/head_*."""

    head: str = "linear"  # a name in the head registry (probe.heads)
    feature: str = "pooled"  # the cache array: pooled, tokens, pooled@K, tokens@K
    lr: float = STUDY.lr
    weight_decay: float = STUDY.weight_decay
    batch_size: int = STUDY.batch_size
    epochs: int = STUDY.epochs
    warmup_steps: int | None = None  # None: the study's, STUDY.warmup_steps(steps per epoch)
    patience: int | None = None  # early stopping on validation; None trains every epoch (the study)
    grad_clip: float | None = STUDY.grad_clip
    seed: int = 0  # head initialisation
    data_seed: int = 0  # batch order
    head_depth: int = 12
    head_preset: str = "deit-b"
    head_weights: str = "default"
    standardize: bool = False  # linear heads: standardize features with train mean/std (MAE-style); not the study
    views: int = 0  # augmented train views of the cache to cycle, epoch e on view (e-1) mod K; 0: the eval view (docs/protocol.md §4)
    protocol: str = "medfm"  # medfm | study: model selection and DeiT-head rules (docs/protocol.md §7)
    train_subset: Subset | None = None  # a labelled subset of the train rows (probe.curve); None: every train row

    def head_options(self) -> dict[str, Any]:
        """The head's own settings (`head_<option>` fields), as its registry entry names them."""
        return {option: getattr(self, f"head_{option}") for option in get_head(self.head).options}

    def shared(self) -> tuple:
        """What heads must agree on to train in the same pass over the data."""
        return (self.feature, self.batch_size, self.epochs, self.warmup_steps, self.patience, self.grad_clip, self.data_seed,
                self.views, self.protocol, self.train_subset)

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the result (the ledger's config); head_* only for heads that use them."""
        data = asdict(self)
        data.pop("seed")
        if self.head != "linear" or not self.standardize:
            data.pop("standardize")  # absent when off, so ledger keys of study-recipe runs do not depend on it
        if self.train_subset is None:
            data.pop("train_subset")  # absent when every train row is used: the keys of earlier runs stay as they were
        used = {f"head_{option}" for option in get_head(self.head).options}
        for key in [k for k in data if k.startswith("head_") and k not in used]:
            data.pop(key)
        return data


@dataclass
class FitResult:
    """One head's outcome: best-validation epoch and weights, their test metrics, per-epoch history."""

    config: TrainConfig
    best_epoch: int
    val_score: float
    val_metrics: Metrics
    test_metrics: Metrics
    history: list[dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    train_seconds: float
    head_init: str  # "random", the weights file of a DeiT head, or "" for a linear head
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (labels, logits) of the best epoch, in row order
    extra: dict[str, Any] = field(default_factory=dict)  # what else the run's metrics.json records (kNN: the chosen k)


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.5 h`: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Pace:
    """The estimated time of a whole run, said once after its first steps, and a plain progress line at most every
    `every` seconds when the console is not a terminal (a log file, a pipe, a batch job), where no live bar shows.

    `probe` (`fit`) and `finetune` both report through it. Short runs stay quiet: the estimate is said only when
    the run will take at least `quiet_below` seconds.
    """

    clock = staticmethod(time.monotonic)
    eta_after = 20  # steps measured before the estimate
    quiet_below = 30.0

    def __init__(self, console: Console | None, what: str, total_steps: int, every: float = 30.0) -> None:
        self.console, self.what, self.total, self.every = console, what, max(int(total_steps), 1), every
        self.plain = console is not None and not console.is_terminal
        self.start = self.last = self.clock()
        self.estimated = False

    def step(self, done: int, where: str = "") -> None:
        """`done` steps of the run are finished; `where` says where it is (e.g. `epoch 3/100`)."""
        if self.console is None:
            return
        done, now = min(done, self.total), self.clock()
        elapsed = now - self.start
        left = elapsed / max(done, 1) * (self.total - done)
        if not self.estimated and done >= min(self.eta_after, self.total):
            self.estimated = True
            if elapsed + left >= self.quiet_below:
                self.console.print(f"{self.what}: about {duration(elapsed + left)} for the whole run "
                                   f"(estimated from the first {done} of {self.total} steps)", highlight=False, soft_wrap=True)
        if self.plain and now - self.last >= self.every and done < self.total:
            self.last = now
            self.console.print(f"{self.what}: {where + ', ' if where else ''}step {done}/{self.total} ({100 * done / self.total:.0f}%), "
                               f"{duration(elapsed)} elapsed, about {duration(left)} left", highlight=False, soft_wrap=True)


def scalar_writer(run_dir: Path) -> SummaryWriter:
    """A TensorBoard writer into a run's folder (`tensorboard --logdir outputs/runs` shows every run); one point per
    epoch (`add_epoch`), never per step, so it costs milliseconds."""
    from torch.utils.tensorboard import SummaryWriter  # on use: the import costs a CLI's start otherwise

    return SummaryWriter(str(run_dir))


def add_epoch(writer: SummaryWriter, epoch: int, train_loss: float, metric: str, val_score: float, lr: float) -> None:
    """The scalars every training run (probe and finetune) writes per epoch: train loss, validation primary metric, lr."""
    writer.add_scalar("train/loss", train_loss, epoch)
    writer.add_scalar(f"val/{metric}", val_score, epoch)
    writer.add_scalar("lr", lr, epoch)


def make_head(config: TrainConfig, row_shape: tuple[int, ...], outputs: int) -> nn.Module:
    """The head for `config`, initialised from `config.seed` alone (the same weights in a sweep or alone)."""
    torch.manual_seed(config.seed)
    return build_head(config.head, row_shape, outputs, protocol=config.protocol, **config.head_options())


def train_head(config: TrainConfig, source: FeatureSource, task: Task, device: torch.device, progress: Progress | None = None) -> FitResult:
    """Train one head from cached features (see `fit`)."""
    head = make_head(config, source.row_shape, task.num_outputs)
    return fit([head], [config], source, task, device, progress)[0]


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
    amp = precision(device)
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
        model.train()
        loss_sum, steps = torch.zeros(len(heads), device=device), 0
        where = f"epoch {epoch}/{shared.epochs}"  # said once per epoch: the step loop stays free of string work
        if progress is not None:
            progress.update(bar, description=f"{what}, {where}")
        for batch in source.train_batches((shared.data_seed, epoch)):
            x, y = _tensors(batch, task, device)
            with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
                logits = model(x)
            losses = _per_head_loss(criterion, logits.float(), y)
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
            if progress is not None:
                progress.advance(bar)
                pace.step((epoch - 1) * steps_per_epoch + steps, where)
        val_logits, val_labels = predict(model, source, "val", task, device, amp.dtype)
        val_losses = _per_head_loss(criterion, torch.from_numpy(val_logits), _label_tensor(val_labels, task, torch.device("cpu")))
        train_losses = (loss_sum / max(steps, 1)).tolist()
        scores = primary_scores(task, val_labels, val_logits)  # every head at once: no per-head library overhead
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
                  getattr(heads[k], "weights_source", ""), {"val": (val_labels, b["val_logits"]), "test": (test_labels, test_logits[k])})
        for k, (c, b) in enumerate(zip(configs, best, strict=True))
    ]


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
    return x, _label_tensor(batch.labels, task, device)


def _label_tensor(labels: np.ndarray, task: Task, device: torch.device) -> torch.Tensor:
    dtype = torch.float32 if task.kind == "multilabel" else torch.int64
    return torch.as_tensor(labels, dtype=dtype, device=device)


def _per_head_loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of each head [H]; heads' losses are summed for backward, so their gradients stay separate."""
    heads, rows = logits.shape[:2]
    if y.ndim == 2:  # multilabel: masked entries (NaN labels) count in neither sum nor mean
        known = (~torch.isnan(y)).sum().clamp(min=1)
        return criterion(logits, y.expand(heads, -1, -1)).sum(dim=(1, 2)) / known
    return criterion(logits.flatten(0, 1), y.repeat(heads)).view(heads, rows).mean(dim=1)
