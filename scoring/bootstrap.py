"""Bootstrap intervals of a run's primary metric from its stored test predictions (`probe report --ci 95`).

A resample is a count vector over the test rows: row i is drawn `counts[i]` times. For classification the rows are
resampled within each class (stratified: every resample keeps the test set's class counts, as the project's stratified
splits do), each class's counts an exact multinomial draw (its n_c rows drawn n_c times with replacement). For
multilabel tasks rows are resampled plainly, all rows as one stratum, since a row belongs to several labels at once.

Each metric is computed from the counts without expanding the rows, vectorised over a block of resamples:

- accuracy, macro recall and quadratic kappa from one confusion matrix per resample (the rows' counts summed per
  (label, prediction) cell);
- ROC-AUC (binary, one-vs-rest macro over classes, and the mean over labels of a multilabel task) as a count-weighted
  Mann-Whitney statistic: the negatives' counts summed cumulatively in score order, read at each positive's score,
  ties counted half. It equals scikit-learn's ROC-AUC of the expanded rows exactly.

Memory is bounded: resamples are processed in blocks of `block_size(rows, boot)` resamples, so that a block holds
at most `BLOCK_ELEMENTS` (resample, row) cells, never B x N. A block's working set is at most `BYTES_PER_CELL` bytes a
cell (the int32 counts, the draw's int64 indices and their bincount; then one label's gathered and cumulated counts),
so one worker's peak extra memory is `BYTES_PER_CELL * BLOCK_ELEMENTS` = 48 MiB for the block, whatever the number of
resamples, plus the prepared scorers: about 12 bytes per row and label (int32 row indices in score order, and each
positive's place among the negatives), and the per-resample values (8 bytes each). With `jobs` > 1 the blocks run on
that many processes (joblib), each holding its own block. Counts are integers and the AUC's sums are exact (int64).

Resample b depends only on (`seed`, `stream`, b, the rows' classes), never on the block size, `jobs` or the runs
scored: runs sharing test rows (the seeds of one cell, a row and its baseline on one dataset) are scored on the same
resamples, so a cell's interval is over the seed-mean metric and a gain's interval is paired.

A resample on which the metric is undefined (a label of a multilabel task left with one class, a kappa with nothing to
weigh) is NaN: counted in `Interval.nan_resamples`, and the interval is over the defined ones. A multilabel resample
is NaN when a label that is defined on the whole test set loses one of its classes: its mean would average other
labels than the score it bounds. A label undefined on the whole test set is left out, as `scoring.metrics` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from scipy.special import expit, softmax

from cache.schema import METRICS
from common.errors import MedfmError

BLOCK_ELEMENTS = 2**21  # (resample, row) cells held at once by one worker
BYTES_PER_CELL = 24  # the most a block holds per cell: int32 counts + int64 draws + their int64 bincount (then less)
SUPPORTED = sorted({m for names in METRICS.values() for m in names})


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval of a metric (`level` in %), over the defined resamples."""

    low: float
    high: float
    level: float
    resamples: int
    nan_resamples: int  # resamples on which the metric was undefined, left out of the interval

    @property
    def defined(self) -> int:
        return self.resamples - self.nan_resamples


def check_settings(level: float, boot: int, jobs: int = 1, seed: int = 0) -> None:
    """Bad interval settings are user errors."""
    if seed < 0:
        raise MedfmError(f"--boot-seed must be a non-negative integer, got {seed}")
    if not (0 < level < 100):
        raise MedfmError(f"--ci is a confidence level in percent, strictly between 0 and 100 (e.g. 95), got {level:g}")
    if boot < 1:
        raise MedfmError(f"--boot must be at least 1 resample, got {boot}")
    if jobs < 1:
        raise MedfmError(f"--jobs must be at least 1, got {jobs}")


def block_size(rows: int, boot: int) -> int:
    """Resamples per block: as many as keep a block within `BLOCK_ELEMENTS` cells (at least 1, at most `boot`)."""
    return max(1, min(boot, BLOCK_ELEMENTS // max(rows, 1)))


def interval(values: np.ndarray, level: float) -> Interval:
    """The percentile interval of the finite resample values (NaN bounds when none is finite)."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[np.isfinite(values)]
    if not len(defined):
        return Interval(math.nan, math.nan, level, len(values), len(values))
    tail = (100 - level) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return Interval(float(low), float(high), level, len(values), len(values) - len(defined))


def bootstrap(metric: str, labels: np.ndarray, logits: np.ndarray | Sequence[np.ndarray], *, level: float = 95, boot: int = 1000,
              seed: int = 0, stream: int = 0, jobs: int = 1) -> Interval:
    """The interval of `metric` on these predictions; several `logits` (runs on the same rows): of their mean metric."""
    check_settings(level, boot, jobs, seed)
    runs = [logits] if isinstance(logits, np.ndarray) else list(logits)
    return interval(resample_metric(metric, labels, runs, boot=boot, seed=seed, stream=stream, jobs=jobs), level)


def resample_metric(metric: str, labels: np.ndarray, runs: Sequence[np.ndarray], *, boot: int, seed: int = 0, stream: int = 0,
                    jobs: int = 1, block: int | None = None) -> np.ndarray:
    """`metric` on each of `boot` resamples of the rows, averaged over `runs` (logits [N, C] each, the same rows in the
    same order as `labels`): [boot] values, NaN where undefined. `stream` tells apart datasets under one `seed`."""
    return resample_each(metric, labels, runs, boot=boot, seed=seed, stream=stream, jobs=jobs, block=block).mean(axis=0)


def resample_each(metric: str, labels: np.ndarray, runs: Sequence[np.ndarray], *, boot: int, seed: int = 0, stream: int = 0,
                  jobs: int = 1, block: int | None = None) -> np.ndarray:
    """`metric` of each run on each resample, [len(runs), boot]: the resamples are drawn once for all the runs (a sweep's
    heads checked together draw them once, not once per head)."""
    labels = np.asarray(labels)
    scorers = [prepare(metric, labels, np.asarray(r)) for r in runs]
    strata = stratify(labels)
    size = block or block_size(len(labels), boot)
    blocks = [(start, min(size, boot - start)) for start in range(0, boot, size)]
    if jobs == 1 or len(blocks) == 1:
        parts = [_block(scorers, strata, len(labels), start, count, seed, stream) for start, count in blocks]
    else:
        chunks = [list(c) for c in np.array_split(np.arange(len(blocks)), min(len(blocks), 4 * jobs))]
        done = Parallel(n_jobs=jobs)(delayed(_blocks)(scorers, strata, len(labels), [blocks[i] for i in c], seed, stream) for c in chunks)
        parts = [part for chunk in done for part in chunk]
    return np.concatenate(parts, axis=1)


def draw_counts(strata: list[np.ndarray], rows: int, resamples: Sequence[int], seed: int = 0, stream: int = 0) -> np.ndarray:
    """Resamples number `resamples` as counts [len(resamples), rows] (int32): within each stratum, its n rows drawn n
    times uniformly with replacement (an exact multinomial), built with one bincount per stratum.

    Resample b reads its own stream of a counter-based generator (numpy's Philox, keyed by (seed, stream), its counter
    starting at b * 2**128): the same draws whatever block or process makes it, and no two resamples overlap."""
    key = np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(2, np.uint64)
    bits = np.random.Philox(key=key)
    rng, start = np.random.Generator(bits), bits.state
    count = len(resamples)
    picks = [np.empty((count, len(members)), dtype=np.int64) for members in strata]
    for i, b in enumerate(resamples):
        bits.state = {**start, "state": {"counter": np.array([0, 0, b, 0], dtype=np.uint64), "key": key}}
        for members, drawn in zip(strata, picks, strict=True):
            drawn[i] = rng.integers(0, len(members), size=len(members))
    counts = np.zeros((count, rows), dtype=np.int32)
    for members, drawn in zip(strata, picks, strict=True):
        n = len(members)
        drawn += (np.arange(count) * n)[:, None]
        counts[:, members] = np.bincount(drawn.ravel(), minlength=count * n).reshape(count, n)
    return counts


def _block(scorers: list, strata: list[np.ndarray], rows: int, start: int, count: int, seed: int, stream: int) -> np.ndarray:
    counts = draw_counts(strata, rows, range(start, start + count), seed, stream)
    with np.errstate(divide="ignore", invalid="ignore"):  # an undefined resample is NaN, counted by `interval`
        return np.array([scorer(counts) for scorer in scorers])  # [runs, count]


def _blocks(scorers: list, strata: list[np.ndarray], rows: int, blocks: list[tuple[int, int]], seed: int, stream: int) -> list[np.ndarray]:
    return [_block(scorers, strata, rows, start, count, seed, stream) for start, count in blocks]


def stratify(labels: np.ndarray) -> list[np.ndarray]:
    """Row indices per class (single-label), or all rows as one stratum (multilabel)."""
    if labels.ndim == 2:
        return [np.arange(len(labels))]
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def prepare(metric: str, labels: np.ndarray, logits: np.ndarray):
    """A scorer of one run: called with counts [B, N], it returns the metric of each resample [B]."""
    if metric not in SUPPORTED:
        raise MedfmError(f"no bootstrap for metric '{metric}'; known: {', '.join(SUPPORTED)}")
    if labels.ndim == 2:
        if metric != "mean_roc_auc":
            raise MedfmError(f"metric '{metric}' is not one of a multilabel task ({', '.join(METRICS['multilabel'])})")
        pairs = []
        for j in range(labels.shape[1]):  # label by label: never all the probabilities at once
            column = labels[:, j].astype(np.float64)
            known = ~np.isnan(column)
            pairs.append(_auc_parts(column[known] == 1, expit(np.asarray(logits[known, j], dtype=np.float64)), np.flatnonzero(known)))
        return _MeanAuc([p for p in pairs if p is not None])
    if metric == "mean_roc_auc":
        raise MedfmError("mean_roc_auc is the metric of a multilabel task; these labels are single-label")
    y = labels.astype(np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    probs = softmax(logits, axis=1)
    classes = logits.shape[1]
    if metric == "roc_auc":
        if any(not (y == c).any() for c in range(classes)):
            return _Undefined()  # a class absent from the test set: NaN, as scoring.metrics says
        columns = [1] if classes == 2 else list(range(classes))
        return _MeanAuc([_auc_parts(y == c, probs[:, c], np.arange(len(y))) for c in columns])
    return _Confusion(metric, y, probs.argmax(axis=1), classes)


@dataclass
class _Undefined:
    def __call__(self, counts: np.ndarray) -> np.ndarray:
        return np.full(len(counts), np.nan)


@dataclass
class _Confusion:
    """accuracy, macro recall (over the classes present) and quadratic kappa from per-resample confusion matrices."""

    metric: str
    order: np.ndarray  # rows sorted by their confusion cell (label * K + prediction)
    starts: np.ndarray  # where each occupied cell's rows start in `order`
    cells: np.ndarray  # the occupied cells
    classes: int
    present: np.ndarray  # classes present among the labels

    def __init__(self, metric: str, y: np.ndarray, pred: np.ndarray, classes: int) -> None:
        cell = y * classes + pred
        self.metric, self.classes = metric, classes
        self.order = np.argsort(cell, kind="stable")
        self.cells, self.starts = np.unique(cell[self.order], return_index=True)
        self.present = np.unique(y)

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        k = self.classes
        confusion = np.zeros((len(counts), k * k))
        confusion[:, self.cells] = np.add.reduceat(np.take(counts, self.order, axis=1), self.starts, axis=1)
        confusion = confusion.reshape(-1, k, k)  # [B, label, prediction]
        diagonal = np.diagonal(confusion, axis1=1, axis2=2)
        truth = confusion.sum(axis=2)
        if self.metric == "accuracy":
            return diagonal.sum(axis=1) / truth.sum(axis=1)
        if self.metric == "macro_recall":
            return (diagonal[:, self.present] / truth[:, self.present]).mean(axis=1)
        weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
        predicted = confusion.sum(axis=1)
        expected = truth[:, :, None] * predicted[:, None, :] / truth.sum(axis=1)[:, None, None]
        denominator = (weights * expected).sum(axis=(1, 2))
        kappa = 1 - (weights * confusion).sum(axis=(1, 2)) / denominator
        return np.where(denominator > 0, kappa, np.nan)


@dataclass
class _AucParts:
    """One label's ROC-AUC as a weighted Mann-Whitney statistic: negatives in score order, and for each positive how
    many negatives score below it (`low`) and at most as high (`high`)."""

    negatives: np.ndarray  # rows of the negatives, by increasing score
    positives: np.ndarray  # rows of the positives
    low: np.ndarray
    high: np.ndarray
    ties: bool

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        below = np.zeros((len(counts), len(self.negatives) + 1), dtype=np.int32)  # counts of the negatives, cumulated
        np.cumsum(np.take(counts, self.negatives, axis=1), axis=1, dtype=np.int32, out=below[:, 1:])
        weights = np.take(counts, self.positives, axis=1)
        # a positive wins over the negatives below it and half of those tied with it: (below[low] + below[high]) / 2
        wins = np.take(below, self.low, axis=1)
        wins += np.take(below, self.high, axis=1) if self.ties else wins
        won = np.einsum("bi,bi->b", weights, wins, dtype=np.int64) / 2  # exact: int64 sums of int32 products
        pairs = weights.sum(axis=1, dtype=np.int64) * below[:, -1].astype(np.int64)
        return won / pairs


def _auc_parts(positive: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> _AucParts | None:
    """The parts of one label's AUC over `rows` (None when the label has one class there: left out, as scoring.metrics)."""
    if positive.all() or not positive.any():
        return None
    negative_order = np.argsort(scores[~positive], kind="stable")
    negative_scores = scores[~positive][negative_order]
    positive_scores = scores[positive]
    low = np.searchsorted(negative_scores, positive_scores, side="left").astype(np.int32)
    high = np.searchsorted(negative_scores, positive_scores, side="right").astype(np.int32)
    return _AucParts(rows[~positive][negative_order].astype(np.int32), rows[positive].astype(np.int32), low, high,
                     bool((low != high).any()))


@dataclass
class _MeanAuc:
    """The mean over labels (or one-vs-rest classes) of their ROC-AUC; NaN on a resample where one is undefined."""

    labels: list[_AucParts]

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        if not self.labels:
            return np.full(len(counts), np.nan)
        total = np.zeros(len(counts))
        for part in self.labels:
            total += part(counts)  # 0/0 is NaN and stays NaN in the sum
        return total / len(self.labels)
