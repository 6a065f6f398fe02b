"""`probe compare`: is run A better than run B on the same test rows, or is the difference noise?

Both runs' stored test predictions (`ledger.predictions`) are put side by side on their sample ids, then:

- **Paired bootstrap** (`paired_bootstrap`): each replicate resamples the test rows once, with replacement, and
  scores both runs on those same rows; the spread of the replicates' difference A - B gives a percentile interval.
  Classification tasks resample within each class (every replicate keeps the test set's class counts, so a metric
  such as ROC-AUC is defined in every one); multilabel tasks resample rows as a whole. A replicate is a vector of
  row multiplicities, and every metric of `scoring.metrics` is computed from it in closed form, vectorised over
  replicates; the tests check each against `compute_metrics` on the resampled rows.
  The p-value is two-sided, from the percentile interval it inverts: twice the share of replicates on the far
  side of 0 (ties at 0 count half), with the usual +1 in numerator and denominator so that B replicates never
  claim a p below 2 / (B + 1): p = min(1, 2 (min(#below 0, #above 0) + 1) / (B + 1)).
- **DeLong's test** (`delong_test`) for binary tasks: the z statistic and p-value of the difference of two correlated
  ROC-AUCs, with DeLong et al. (1988)'s covariance computed by the midrank algorithm of Sun & Xu (2014),
  O(K N log N) for K score vectors.

A side may be several runs, the seeds of one configuration: its score is then the mean of their scores, the value a
cell of `probe report` shows, on every replicate as on the whole test set (and DeLong tests that mean's contrast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from cache.schema import Task
from common.errors import MedfmError
from ledger.predictions import Predictions, load_predictions
from ledger.records import RunRecord, best_configuration, mean_score
from ledger.runs import run_task
from ledger.store import Ledger
from scoring.bootstrap import prepare, resample_metric

LEVEL = 0.95  # the interval's coverage
Side = Predictions | Sequence[Predictions]  # one run, or the seeds of one configuration


@dataclass(frozen=True)
class PairedResult:
    """The paired bootstrap of metric(A) - metric(B) (see the module's docstring)."""

    diff: float  # on the whole test set; each side the mean over its seeds
    low: float  # the percentile interval of the difference at LEVEL
    high: float
    p: float  # two-sided
    nan_resamples: int  # replicates where a side's metric was undefined (NaN): left out of the interval and p


@dataclass(frozen=True)
class DeLongResult:
    auc_a: float  # each side's ROC-AUC (the mean over its seeds)
    auc_b: float
    z: float  # (AUC_A - AUC_B) / its DeLong standard error
    p: float  # two-sided, normal


# --- the paired bootstrap ---------------------------------------------------------------------------------------------

def paired_bootstrap(a: Side, b: Side, task: Task, boot: int = 2000, seed: int = 0) -> PairedResult:
    """The paired bootstrap of the primary-metric difference A - B over `boot` replicates of the test rows, drawn from
    `seed` by `scoring.bootstrap.resample_metric`: both sides are scored on the same resamples. Refuses (one line)
    predictions on different test rows or with different labels for the same rows."""
    if boot < 1:
        raise MedfmError(f"--boot must be a positive number of bootstrap resamples, got {boot}")
    first = _seeds(a)[0]
    sides = [[align(p, first) for p in _seeds(side)] for side in (a, b)]
    labels = np.asarray(first.labels)
    scorers = [[prepare(task.primary_metric, labels, np.asarray(p.logits)) for p in side] for side in sides]
    whole = np.ones((1, len(labels)), dtype=np.int32)  # the test set itself: what `compute_metrics` gives, to rounding
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = float(_side_mean([s(whole) for s in scorers[0]])[0] - _side_mean([s(whole) for s in scorers[1]])[0])
    metric = task.primary_metric
    d = (resample_metric(metric, labels, [np.asarray(p.logits) for p in sides[0]], boot=boot, seed=seed)
         - resample_metric(metric, labels, [np.asarray(p.logits) for p in sides[1]], boot=boot, seed=seed))
    finite = d[np.isfinite(d)]
    if not len(finite):
        return PairedResult(diff, math.nan, math.nan, math.nan, boot)
    tail = 0.5 * (1 - LEVEL)
    low, high = np.quantile(finite, [tail, 1 - tail])
    ties = 0.5 * np.count_nonzero(finite == 0)
    below, above = np.count_nonzero(finite < 0) + ties, np.count_nonzero(finite > 0) + ties
    p = min(1.0, 2 * (min(below, above) + 1) / (len(finite) + 1))
    return PairedResult(float(diff), float(low), float(high), float(p), int(boot - len(finite)))


def align(p: Predictions, reference: Predictions) -> Predictions:
    """`p` in the row order of `reference`; one line when they hold different test rows or disagree on a label."""
    if len(p.ids) != len(reference.ids) or set(p.ids.tolist()) != set(reference.ids.tolist()):
        ours, theirs = set(p.ids.tolist()), set(reference.ids.tolist())
        raise MedfmError(f"the runs were scored on different test sets ({len(theirs)} and {len(ours)} rows, "
                         f"{len(ours ^ theirs)} ids in only one); a paired comparison needs the same test rows")
    if len(set(p.ids.tolist())) != len(p.ids):
        raise MedfmError("a run's stored predictions repeat a test id; a paired comparison needs one row per sample")
    if not np.array_equal(p.ids, reference.ids):
        where = {sample: i for i, sample in enumerate(p.ids.tolist())}
        order = np.array([where[sample] for sample in reference.ids.tolist()])
        p = Predictions(p.ids[order], p.labels[order], p.logits[order])
    if not np.array_equal(np.asarray(p.labels), np.asarray(reference.labels), equal_nan=p.labels.dtype.kind == "f"):
        raise MedfmError("the runs hold the same test ids with different labels (another label policy or dataset version); "
                         "a paired comparison needs the same test set")
    return p


def score_resamples(task: Task, labels: np.ndarray, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The primary metric on each resample [B], a resample given as row multiplicities `weights` [B, N] (row i
    drawn weights[b, i] times), by `scoring.bootstrap.prepare`: NaN where it is undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return prepare(task.primary_metric, np.asarray(labels), np.asarray(logits))(np.asarray(weights).astype(np.int32))


def _seeds(side: Side) -> list[Predictions]:
    seeds = [side] if isinstance(side, Predictions) else list(side)
    if not seeds:
        raise ValueError("a side of a comparison needs at least one run's predictions")
    return seeds


def _side_mean(scores: list[np.ndarray]) -> np.ndarray:
    """Per replicate, the mean over seeds of the finite scores (`ledger.store.mean_score`); NaN when none is."""
    stacked = np.stack(scores)
    finite = np.isfinite(stacked)
    count = finite.sum(0)
    total = np.where(finite, stacked, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def delong_covariance(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUCs [K] of K score vectors [K, N] on the same rows and DeLong's covariance of them [K, K], by the midrank
    algorithm of Sun & Xu (2014): the structural components come from ranks within each class and over all rows."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    x, y = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    if m < 2 or n < 2:
        raise MedfmError(f"DeLong's test needs at least two positive and two negative test rows, got {m} and {n}")
    tx = np.stack([midranks(row) for row in x])
    ty = np.stack([midranks(row) for row in y])
    tz = np.stack([midranks(row) for row in np.concatenate([x, y], axis=1)])
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: the share of negatives it outranks (ties half)
    v01 = 1 - (tz[:, m:] - ty) / m  # per negative: the share of positives that outrank it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's z and two-sided p for AUC(A) - AUC(B) on the same rows; a side of several score vectors [K, N] (seeds)
    is their mean AUC, the contrast's variance taken from the joint covariance of all K_A + K_B curves."""
    a, b = np.atleast_2d(scores_a), np.atleast_2d(scores_b)
    aucs, cov = delong_covariance(np.asarray(labels) == 1, np.concatenate([a, b]))
    contrast = np.r_[np.full(len(a), 1 / len(a)), np.full(len(b), -1 / len(b))]
    diff, variance = float(contrast @ aucs), float(contrast @ cov @ contrast)
    if variance <= 0:  # e.g. the same scores on both sides: nothing varies
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
    else:
        z = diff / math.sqrt(variance)
    return DeLongResult(float(aucs[: len(a)].mean()), float(aucs[len(a):].mean()), z, math.erfc(abs(z) / math.sqrt(2)))


def binary_scores(logits: np.ndarray) -> np.ndarray:
    """The positive class's probability of a binary task's two logits, as `scoring.metrics` scores ROC-AUC."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)[:, 1]


# --- runs from the ledger ---------------------------------------------------------------------------------------------

@dataclass
class Runs:
    """One side of a comparison: a run, or the seeds of the best configuration of a backbone x scenario x dataset."""

    records: list[RunRecord]
    predictions: list[Predictions]
    task: Task

    @property
    def label(self) -> str:
        r = self.records[0]
        ids = ", ".join(str(x.id) for x in self.records)
        seeds = f"seeds {', '.join(str(x.seed) for x in self.records)}" if len(self.records) > 1 else f"seed {r.seed}"
        random = " [RANDOM backbone weights]" if r.backbone_random else ""
        return (f"{r.backbone} {r.scenario} on {r.dataset_label or r.dataset} ({r.stage}, run{'s' if len(self.records) > 1 else ''} "
                f"{ids}, {seeds}){random}")

    @property
    def test_score(self) -> float:
        return mean_score([r.test_primary for r in self.records])

    @property
    def flags(self) -> list[str]:
        """What the ledger flagged in this side's runs: a best epoch in the last tenth (`late`, perhaps unconverged),
        predictions collapsed to one class, a score within noise of chance; each with the runs it concerns."""
        found = []
        for flag, word in (("late_best", "best epoch late (perhaps not converged)"), ("collapsed", "collapsed to one class"),
                           ("chance", "within noise of chance")):
            flagged = [str(r.id) for r in self.records if getattr(r, flag)]
            if flagged:
                found.append(f"{word} (run{'s' if len(flagged) > 1 else ''} {', '.join(flagged)})")
        return found


@dataclass
class Comparison:
    a: Runs
    b: Runs
    rows: int  # test rows compared
    boot: int
    seed: int
    paired: PairedResult
    delong: DeLongResult | None  # binary tasks only
    allow_flagged: bool = False  # give the verdict even when a side's runs are flagged (`Runs.flags`)


def runs_by_id(ledger: Ledger, run_id: int) -> Runs:
    """The ledger row `run_id` with its stored test predictions."""
    found = ledger.rows(id=run_id)
    if not found:
        raise MedfmError(f"no run {run_id} in the ledger {ledger.path} (a run's id is the ledger's `id` column)")
    return _runs(found)


def best_runs(ledger: Ledger, backbone: str, scenario: str, dataset: str) -> Runs:
    """The seeds of the configuration with the best mean validation score of a backbone x scenario on a dataset (a name,
    a label such as csv:a1b2, or a dataset id prefix), as `probe report` picks a cell; label-efficiency runs (on a
    subset of the train rows, `probe curve`) never count."""
    rows = [r for r in ledger.rows(backbone=backbone, scenario=scenario)
            if (dataset in (r.dataset, r.dataset_label) or (len(dataset) >= 4 and (r.dataset_id.startswith(dataset) or r.data_id.startswith(dataset))))
            and not r.config.get("train_subset")]
    if not rows:
        raise MedfmError(f"the ledger holds no {scenario} run of {backbone} on {dataset}; train one, or check `probe report`")
    versions = sorted({r.data_id for r in rows})
    if len(versions) > 1:
        raise MedfmError(f"{backbone} {scenario} has runs on {len(versions)} versions of {dataset} (dataset ids "
                         f"{', '.join(v[:8] for v in versions)}): pass --dataset with one of these ids")
    return _runs(best_configuration(rows))


def _runs(records: list[RunRecord]) -> Runs:
    tasks = [run_task(r) for r in records]
    if any(task != tasks[0] for task in tasks):
        raise MedfmError(f"runs {', '.join(str(r.id) for r in records)}, the seeds of one configuration, disagree on the task")
    return Runs(records, [load_predictions(r.run_dir, "test") for r in records], tasks[0])


def compare(a: Runs, b: Runs, *, boot: int = 2000, seed: int = 0, allow_flagged: bool = False) -> Comparison:
    """The paired bootstrap of A - B, and DeLong's test for binary tasks; refuses runs of different tasks or test sets."""
    if a.task != b.task:
        raise MedfmError(f"the runs have different tasks ({a.task.kind} {', '.join(a.task.class_names)} scored by "
                         f"{a.task.primary_metric}; {b.task.kind} {', '.join(b.task.class_names)} scored by {b.task.primary_metric}): "
                         "nothing to compare")
    paired = paired_bootstrap(a.predictions, b.predictions, a.task, boot, seed)
    delong = None
    if a.task.kind == "binary":
        reference = a.predictions[0]
        aligned = [[align(p, reference) for p in side.predictions] for side in (a, b)]
        delong = delong_test(reference.labels, *(np.stack([binary_scores(p.logits) for p in side]) for side in aligned))
    return Comparison(a, b, len(a.predictions[0].ids), boot, seed, paired, delong, allow_flagged)


def describe(result: Comparison) -> list[str]:
    """The lines `probe compare` prints."""
    metric, p = result.a.task.primary_metric, result.paired
    kind = "stratified by class" if result.a.task.kind != "multilabel" else "rows resampled as a whole"
    lines = [f"A: {result.a.label}: test {metric} {result.a.test_score:.4f}",
             f"B: {result.b.label}: test {metric} {result.b.test_score:.4f}",
             f"paired bootstrap on the same {result.rows} test rows ({result.boot} resamples, {kind}, seed {result.seed}):",
             f"  A - B in {metric}: {p.diff:+.4f}, {100 * LEVEL:.0f}% interval [{p.low:+.4f}, {p.high:+.4f}], "
             + (f"p <= {p.p:.4f} (the least {result.boot - p.nan_resamples} resamples can show)"
                if p.p <= 2 / (result.boot - p.nan_resamples + 1) else f"p = {_p(p.p)}")
             + (f" ({p.nan_resamples} resamples with an undefined {metric} left out)" if p.nan_resamples else "")]
    if result.delong is not None:
        d = result.delong
        lines.append(f"DeLong's test of the ROC-AUCs: A {d.auc_a:.4f}, B {d.auc_b:.4f}, z = {d.z:+.3f}, p = {_p(d.p)}")
    flagged = [f"{side} {flag}" for side, runs in (("A", result.a), ("B", result.b)) for flag in runs.flags]
    if flagged:
        lines.append(f"no verdict: {'; '.join(flagged)}: a flagged run's score says little about its backbone; retrain it "
                     "(e.g. --standardize or more --epochs) or pass --allow-flagged to see the verdict anyway")
    if flagged and not result.allow_flagged:
        return lines
    if math.isfinite(p.low) and (p.low > 0 or p.high < 0):
        lines.append(f"the interval excludes 0: {'A' if p.diff > 0 else 'B'} scores higher on this test set"
                     + (" (flagged runs: read with care)" if flagged else ""))
    else:
        lines.append("the interval includes 0: no difference shown on this test set")
    return lines


def certified(result: Comparison) -> bool:
    """Whether the comparison may be taken as an answer: neither side flagged, or `--allow-flagged`."""
    return result.allow_flagged or not (result.a.flags or result.b.flags)


def _p(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"
