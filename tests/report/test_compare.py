"""`probe compare`: the paired bootstrap and DeLong's test of two runs on the same test rows.

DeLong's fast midrank algorithm is checked against the O(n^2) definition of DeLong et al. (1988), written plainly
here; the bootstrap's vectorised metrics against `compute_metrics` on the resampled rows; the paired test's false
positive rate on two equally good models against its nominal 5%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cache.layout import open_cache
from cache.schema import METRICS, Task
from common.errors import MedfmError
from ledger.predictions import Predictions
from ledger.store import Ledger
from probe.cli import main
from probe.config import TrainConfig
from probe.sweep import Grid, expand, run_sweep
from report.compare import align, binary_scores, delong_covariance, delong_test, paired_bootstrap, score_resamples
from scoring.bootstrap import draw_counts, stratify
from scoring.metrics import compute_metrics
from tests.probe.caches import make_cache
from tests.tiny import BINARY, MULTICLASS, QUIET, run_main

# --- DeLong against its definition --------------------------------------------------------------------------------------

def delong_reference(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong, DeLong & Clarke-Pearson (1988), as written: psi over every (positive, negative) pair, the structural
    components V10 (per positive) and V01 (per negative), S = S10 / m + S01 / n."""
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    k, m, n = len(scores), pos.shape[1], neg.shape[1]
    v10, v01 = np.zeros((k, m)), np.zeros((k, n))
    for r in range(k):
        for i in range(m):
            for j in range(n):
                psi = 1.0 if pos[r, i] > neg[r, j] else 0.5 if pos[r, i] == neg[r, j] else 0.0
                v10[r, i] += psi / n
                v01[r, j] += psi / m
    aucs = v10.mean(axis=1)
    s10 = np.array([[np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1) for b in range(k)] for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1) for b in range(k)] for a in range(k)])
    return aucs, s10 / m + s01 / n


def reference_test(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    aucs, cov = delong_reference(labels, np.concatenate([a, b]))
    contrast = np.r_[np.full(len(a), 1 / len(a)), np.full(len(b), -1 / len(b))]
    z = float(contrast @ aucs / math.sqrt(contrast @ cov @ contrast))
    return z, math.erfc(abs(z) / math.sqrt(2))


def delong_cases():
    rng = np.random.default_rng(7)
    for n, positives, ties, seeds in ((60, 25, False, 1), (80, 20, True, 1), (45, 30, True, 3), (90, 45, False, 2)):
        labels = np.zeros(n, dtype=int)
        labels[rng.permutation(n)[:positives]] = 1
        shared = rng.normal(size=n)
        a = labels + shared + rng.normal(size=(seeds, n))
        b = 0.6 * labels + shared + rng.normal(size=(seeds, n))
        if ties:  # coarse scores: many ties within and across classes
            a, b = np.round(a), np.round(b * 2) / 2
        yield labels, a, b


def test_delong_equals_the_structural_components_definition_to_1e_6():
    worst = 0.0
    for labels, a, b in delong_cases():
        scores = np.concatenate([a, b])
        aucs, cov = delong_covariance(labels == 1, scores)
        ref_aucs, ref_cov = delong_reference(labels, scores)
        result = delong_test(labels, a, b)
        z, p = reference_test(labels, a, b)
        differences = [*np.abs(aucs - ref_aucs), *np.abs(cov - ref_cov).ravel(), abs(result.z - z), abs(result.p - p),
                       abs(result.auc_a - ref_aucs[: len(a)].mean()), abs(result.auc_b - ref_aucs[len(a):].mean())]
        worst = max(worst, *differences)
        assert max(differences) < 1e-6
    print(f"DeLong vs the O(n^2) definition: max difference {worst:.2e}")


def test_delong_auc_is_the_auc_the_run_reports():
    labels, a, b = next(delong_cases())
    logits = np.stack([np.zeros_like(a[0]), a[0]], axis=1)
    result = delong_test(labels, binary_scores(logits), binary_scores(np.stack([np.zeros_like(b[0]), b[0]], axis=1)))
    assert result.auc_a == pytest.approx(compute_metrics(BINARY, labels, logits)["roc_auc"], abs=1e-12)
    same = delong_test(labels, a[0], a[0])
    assert (same.z, same.p) == (0.0, 1.0)  # one model against itself: nothing to tell apart


# --- the paired bootstrap ---------------------------------------------------------------------------------------------

def predictions(labels: np.ndarray, logits: np.ndarray, ids: np.ndarray | None = None) -> Predictions:
    ids = np.array([f"t{i}" for i in range(len(labels))]) if ids is None else ids
    return Predictions(ids, labels, logits)


def task_data(task: Task, rng: np.random.Generator, n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    if task.kind == "multilabel":
        labels = (rng.random((n, len(task.class_names))) < 0.4).astype(np.float32)
        labels[rng.random(labels.shape) < 0.2] = np.nan  # unknown entries, as CheXpert's ignore policy
    else:
        labels = np.r_[np.arange(task.num_outputs), rng.integers(0, task.num_outputs, n - task.num_outputs)]
    return labels, np.round(rng.normal(size=(n, task.num_outputs)), 1)  # rounded: tied scores


@pytest.mark.parametrize("task", [Task(kind, ("a", "b", "c", "d") if kind != "binary" else ("n", "p"), metric)
                                  for kind, metrics in METRICS.items() for metric in metrics], ids=lambda t: f"{t.kind}-{t.primary_metric}")
def test_each_metric_on_row_multiplicities_equals_compute_metrics_on_the_resampled_rows(task):
    rng = np.random.default_rng(3)
    labels, logits = task_data(task, rng)
    weights = draw_counts(stratify(labels), len(labels), range(40), seed=3)
    got = score_resamples(task, labels, logits, weights)
    for w, value in zip(weights, got, strict=True):
        rows = np.repeat(np.arange(len(labels)), w.astype(int))
        expected = compute_metrics(task, labels[rows], logits[rows])[task.primary_metric]
        if task.kind == "multilabel" and any(len(np.unique(labels[rows, j][~np.isnan(labels[rows, j])])) < 2 for j in range(labels.shape[1])):
            assert math.isnan(value)  # a label lost a class: the mean would average other labels
        else:
            assert value == pytest.approx(expected, abs=1e-12, nan_ok=True)
    assert np.isfinite(got).sum() >= 30


def test_the_paired_test_on_two_equally_good_models_rejects_at_its_nominal_rate():
    """Two models with the same score distribution (signal + independent noise) on the same labels: at alpha 0.05 the
    paired bootstrap (and DeLong) reject in 3-7% of 2000 repeats; the binomial sd at 5% is 0.49%, so 3-7% is 4 sd wide."""
    repeats, boot, n = 2000, 400, 200
    rng = np.random.default_rng(12345)
    labels = np.r_[np.zeros(n // 2, dtype=int), np.ones(n // 2, dtype=int)]
    ids = np.array([f"t{i}" for i in range(n)])
    bootstrap = delong = 0
    for r in range(repeats):
        a, b = (np.stack([np.zeros(n), labels + rng.normal(size=n)], axis=1) for _ in range(2))
        bootstrap += paired_bootstrap(Predictions(ids, labels, a), Predictions(ids, labels, b), BINARY, boot, r).p < 0.05
        delong += delong_test(labels, binary_scores(a), binary_scores(b)).p < 0.05
    print(f"false positive rate at alpha 0.05 over {repeats} repeats: paired bootstrap {bootstrap / repeats:.4f}, "
          f"DeLong {delong / repeats:.4f}")
    assert 0.03 <= bootstrap / repeats <= 0.07
    assert 0.03 <= delong / repeats <= 0.07


def test_a_real_difference_is_found_and_swapping_the_sides_mirrors_the_result():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(150, dtype=int), np.ones(150, dtype=int)]
    shared = rng.normal(size=300)
    better = np.stack([np.zeros(300), 1.5 * labels + shared + rng.normal(size=300)], axis=1)
    worse = np.stack([np.zeros(300), 0.5 * labels + shared + rng.normal(size=300)], axis=1)
    ab = paired_bootstrap(predictions(labels, better), predictions(labels, worse), BINARY, 1000, 0)
    ba = paired_bootstrap(predictions(labels, worse), predictions(labels, better), BINARY, 1000, 0)
    observed = compute_metrics(BINARY, labels, better)["roc_auc"] - compute_metrics(BINARY, labels, worse)["roc_auc"]
    assert ab.diff == pytest.approx(observed, abs=1e-12) and 0 < ab.low < ab.diff < ab.high
    assert ab.p < 0.01 and ab.nan_resamples == 0
    assert (ba.diff, ba.low, ba.high, ba.p) == pytest.approx((-ab.diff, -ab.high, -ab.low, ab.p), abs=1e-12)
    assert paired_bootstrap(predictions(labels, better), predictions(labels, worse), BINARY, 1000, 0) == ab  # seeded
    same = paired_bootstrap(predictions(labels, better), predictions(labels, better), BINARY, 200, 0)
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_a_side_of_several_seeds_is_scored_by_their_mean_as_the_report_cell():
    rng = np.random.default_rng(2)
    labels, _ = task_data(MULTICLASS, rng, 120)
    seeds = [predictions(labels, np.eye(4)[labels] * s + rng.normal(size=(120, 4))) for s in (1.0, 1.5, 2.0)]
    other = predictions(labels, rng.normal(size=(120, 4)))
    result = paired_bootstrap(seeds, other, MULTICLASS, 300, 0)
    mean = np.mean([compute_metrics(MULTICLASS, labels, p.logits)["accuracy"] for p in seeds])
    assert result.diff == pytest.approx(mean - compute_metrics(MULTICLASS, labels, other.logits)["accuracy"], abs=1e-12)


def test_predictions_are_aligned_by_id_and_other_test_sets_or_labels_are_refused():
    labels = np.array([0, 1, 0, 1, 1, 0])
    logits = np.arange(12, dtype=float).reshape(6, 2)
    a = predictions(labels, logits)
    order = np.array([3, 0, 5, 1, 4, 2])
    shuffled = Predictions(a.ids[order], labels[order], logits[order])
    back = align(shuffled, a)
    np.testing.assert_array_equal(back.logits, logits)
    with pytest.raises(MedfmError, match="different test sets"):
        align(Predictions(a.ids[:5], labels[:5], logits[:5]), a)
    with pytest.raises(MedfmError, match="different test sets"):
        align(Predictions(np.array(["t0", "t1", "t2", "t3", "t4", "x"]), labels, logits), a)
    with pytest.raises(MedfmError, match="different labels"):
        align(Predictions(a.ids, 1 - labels, logits), a)
    with pytest.raises(MedfmError, match="--boot must be a positive"):
        paired_bootstrap(a, a, BINARY, 0, 0)


# --- the command --------------------------------------------------------------------------------------------------------

def train(path, backbone: str, seeds=(0,)) -> list[int]:
    """Linear heads on a tiny cache, trained as a sweep; their ledger ids."""
    with open_cache(path, None, None) as reader:
        configs = expand(reader, Grid(lrs=(1e-2,), seeds=seeds), TrainConfig(epochs=3, batch_size=16))
        return [r.id for r in run_sweep(reader, configs, device="cpu", console=QUIET).records]


def test_probe_compare_by_ids_and_by_backbone_prints_the_interval_p_and_delong(isolated_outputs, monkeypatch):
    features = isolated_outputs / "features"
    rows = {"train": 96, "val": 40, "test": 120}
    strong = make_cache(features / "dinov2" / "demo-aaaaaaaaaaaa.h5", backbone="dinov2", task=BINARY, rows=rows, separation=3.0,
                        settings={"backbone": "dinov2"})
    weak = make_cache(features / "deit" / "demo-bbbbbbbbbbbb.h5", task=BINARY, rows=rows, separation=0.3, settings={"backbone": "deit"})
    a, b = train(strong, "dinov2", seeds=(0, 1)), train(weak, "deit")
    code, out, err = run_main(main, ["compare", str(a[0]), str(b[0]), "--boot", "300", "--allow-flagged"], monkeypatch)
    said = " ".join(out.split())
    assert code == 0, err  # 3 epochs: the runs may be flagged late, which the next test is about
    assert f"A: dinov2 frozen-linear on demo (probe, run {a[0]}, seed 0)" in said and "B: deit frozen-linear" in said
    assert "paired bootstrap on the same 120 test rows (300 resamples, stratified by class, seed 0)" in said
    assert "A - B in roc_auc: +" in said and "DeLong's test of the ROC-AUCs" in said and "the interval excludes 0: A" in said
    code, out, err = run_main(main, ["compare", "--backbone", "dinov2", "--vs", "deit", "--dataset", "demo", "--boot", "300",
                                     "--allow-flagged"], monkeypatch)
    assert code == 0, err
    assert f"runs {a[0]}, {a[1]}, seeds 0, 1" in " ".join(out.split())  # the best configuration's seeds, as the report's cell


def test_probe_compare_refuses_other_test_sets_other_tasks_and_bad_settings_in_one_line(isolated_outputs, monkeypatch):
    features = isolated_outputs / "features"
    base = train(make_cache(features / "deit" / "demo-aaaaaaaaaaaa.h5", task=BINARY, settings={"n": 1}), "deit")[0]
    fewer = train(make_cache(features / "deit" / "demo-bbbbbbbbbbbb.h5", task=BINARY, rows={"train": 144, "val": 48, "test": 40},
                             settings={"n": 2}), "deit")[0]
    multiclass = train(make_cache(features / "dino" / "demo-cccccccccccc.h5", backbone="dino", settings={"n": 3}), "dino")[0]
    cases = [
        (["compare", str(base), str(fewer)], "the runs were scored on different test sets (48 and 40 rows"),
        (["compare", str(base), str(multiclass)], "the runs have different tasks"),
        (["compare", str(base), str(base), "--boot", "0"], "--boot must be a positive number of bootstrap resamples, got 0"),
        (["compare", str(base)], "give both run ids"),
        (["compare", str(base), "999"], "no run 999 in the ledger"),
        (["compare", "--backbone", "deit", "--vs", "dino"], "needs --backbone A, --vs B and --dataset D"),
        (["compare", str(base), str(base), "--backbone", "deit"], "by id (probe compare RUN_A RUN_B) or pick them"),
        (["compare", "--backbone", "sam", "--vs", "deit", "--dataset", "demo"], "no frozen-linear run of sam on demo"),
    ]
    for args, message in cases:
        code, out, err = run_main(main, args, monkeypatch)
        assert code == 2 and message in " ".join(err.split()), (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err
    assert len(Ledger().rows()) == 3


def test_probe_compare_gives_no_verdict_on_a_flagged_run_and_exits_1_unless_allowed(isolated_outputs, monkeypatch):
    """A run flagged late (perhaps unconverged), collapsed or at chance is never certified: the flag is in the verdict
    line, and the exit code is 1; --allow-flagged shows the verdict, marked, with exit 0."""
    features = isolated_outputs / "features"
    rows = {"train": 96, "val": 40, "test": 120}
    strong = make_cache(features / "dinov2" / "demo-aaaaaaaaaaaa.h5", backbone="dinov2", task=BINARY, rows=rows, separation=3.0,
                        settings={"backbone": "dinov2"})
    weak = make_cache(features / "deit" / "demo-bbbbbbbbbbbb.h5", task=BINARY, rows=rows, separation=0.3, settings={"backbone": "deit"})
    a, b = train(strong, "dinov2"), train(weak, "deit")
    ledger = Ledger()
    with ledger._connect() as db:  # A as a run that converged early, B as one whose best epoch was its last
        db.execute("UPDATE runs SET late_best = 0, collapsed = 0, chance = 0 WHERE id = ?", (a[0],))
        db.execute("UPDATE runs SET late_best = 1 WHERE id = ?", (b[0],))
    code, out, _ = run_main(main, ["compare", str(a[0]), str(b[0]), "--boot", "200"], monkeypatch)
    said = " ".join(out.split())
    assert code == 1
    assert f"no verdict: B best epoch late (perhaps not converged) (run {b[0]})" in said and "--allow-flagged" in said
    assert "excludes 0" not in said and "includes 0" not in said
    code, out, _ = run_main(main, ["compare", str(a[0]), str(b[0]), "--boot", "200", "--allow-flagged"], monkeypatch)
    said = " ".join(out.split())
    assert code == 0 and "no verdict" in said and "the interval excludes 0: A scores higher on this test set (flagged runs" in said
