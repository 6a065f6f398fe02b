"""The default linear probe (`--solver lbfgs`, probe/logreg.py): a logistic regression on standardized features solved to
convergence, C chosen on validation; scikit-learn's LogisticRegression is the reference. `--protocol study` keeps the
study's AdamW recipe and its ledger keys."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.special import log_softmax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from cache.layout import open_cache
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheWriter, FeatureSpec, SplitPlan
from ledger.predictions import load_predictions
from ledger.records import config_key
from ledger.store import Ledger
from probe.cli import main
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.logreg import fit_logreg
from probe.run import ledger_key, run_probe
from probe.solvers import C_GRID
from tests.conftest import REPO
from tests.probe.caches import make_cache
from tests.tiny import MULTILABEL, QUIET, run_main

CPU = torch.device("cpu")
DIGITS = Task("multiclass", tuple(str(d) for d in range(10)), "accuracy")


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1,797 8x8 digits as 64 features: a stratified 60/20/20 train/val/test split."""
    x, y = load_digits(return_X_y=True)
    train, rest = train_test_split(np.arange(len(y)), test_size=0.4, stratify=y, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    return {split: (x[rows].astype(np.float32), y[rows]) for split, rows in (("train", train), ("val", val), ("test", test))}


def write_cache(path: Path, task: Task, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """`splits` (features, labels) as a cache's pooled feature, written as `extract run` writes one."""
    plan = {split: SplitPlan([f"{split}-{i}" for i in range(len(y))], y, {"pooled": FeatureSpec(x.shape[1:], "float32")})
            for split, (x, y) in splits.items()}
    meta = CacheMeta(BackboneInfo("deit", random_weights=False), DatasetInfo(path.stem), task, layers=(11,), num_layers=12)
    writer = CacheWriter.open(path, meta, plan)
    for split, (x, _) in splits.items():
        writer.write(split, 0, {"pooled": x.astype(np.float32)})
    return writer.finalize()


def digits_cache(path: Path) -> Path:
    return write_cache(path, DIGITS, digits_splits())


def standardized(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every split standardized with the train mean and std (a constant column left unscaled), in float64."""
    train = splits["train"][0].astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    return {split: ((x - mean) / std, y) for split, (x, y) in splits.items()}


def sklearn_probe(splits: dict[str, tuple[np.ndarray, np.ndarray]], grid: tuple[float, ...]) -> tuple[float, dict[float, float], float]:
    """scikit-learn's LogisticRegression (lbfgs, to convergence) for each C, the C of the best validation accuracy (the
    first of equals, as `improves` keeps it): (that C, every C's validation accuracy, its test accuracy)."""
    (x, y), (xv, yv), (xt, yt) = (splits[s] for s in ("train", "val", "test"))
    models = {c: LogisticRegression(C=c, tol=1e-8, max_iter=20_000).fit(x, y) for c in sorted(grid)}
    val = {c: m.score(xv, yv) for c, m in models.items()}
    chosen = max(val, key=lambda c: (val[c], -c))
    return chosen, val, models[chosen].score(xt, yt)


def sklearn_objective(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, c: float) -> float:
    """scikit-learn's objective over C x n: the mean cross-entropy + ||W||^2 / (2 C n)."""
    logp = log_softmax(x @ weight.T + bias, axis=1)
    return float(-logp[np.arange(len(y)), y].mean() + (weight**2).sum() / (2 * c * len(x)))


def test_the_default_probe_matches_scikit_learns_logistic_regression_with_c_chosen_on_the_same_validation_split(isolated_outputs):
    path = digits_cache(isolated_outputs / "digits.h5")
    with open_cache(path, None, None) as reader:
        record = run_probe(reader, TrainConfig(), console=QUIET).record  # the default: no solver, lr or epochs given
    assert record.config["solver"] == "lbfgs" and not record.late_best
    metrics = json.loads(Path(record.run_dir, "metrics.json").read_text())
    history = [json.loads(line) for line in Path(record.run_dir, "history.jsonl").read_text().splitlines()]
    assert [row["C"] for row in history] == list(C_GRID) and all(row["converged"] for row in history)
    assert history[metrics["best_epoch"] - 1]["C"] == metrics["C"]

    chosen, val, test = sklearn_probe(standardized(digits_splits()), C_GRID)
    assert abs(record.test_primary - test) <= 0.01, (record.test_primary, test, metrics["C"], chosen)
    assert metrics["C"] == chosen or val[chosen] - val[metrics["C"]] <= 0.01
    assert record.val_score == pytest.approx(val[metrics["C"]], abs=0.01)


def test_its_objective_at_the_solution_is_scikit_learns(tmp_path):
    path = digits_cache(tmp_path / "digits.h5")
    with open_cache(path, None, None) as reader:
        result = fit_logreg(TrainConfig(c_grid=(1.0,)), FeatureSource(reader, "pooled", 64), reader.task, CPU)
    splits = standardized(digits_splits())
    (x, y) = splits["train"]
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=20_000).fit(x, y)
    theirs = sklearn_objective(x, y, reference.coef_, reference.intercept_, 1.0)
    weight, bias = (result.state_dict[k].double().numpy() for k in ("linear.weight", "linear.bias"))
    ours = sklearn_objective(x, y, weight, bias, 1.0)
    assert abs(ours - theirs) < 1e-6 * theirs, (ours, theirs)
    for features, _ in splits.values():  # the same classifier: the same class for every row of every split
        np.testing.assert_array_equal((features @ weight.T + bias).argmax(1), reference.predict(features))


def test_a_streamed_cache_gives_the_same_head_as_one_in_memory(tmp_path):
    path = digits_cache(tmp_path / "digits.h5")
    config = TrainConfig(c_grid=(0.1, 1.0))
    with open_cache(path, None, None) as reader:
        ram = fit_logreg(config, FeatureSource(reader, "pooled", 64), reader.task, CPU)
        source = FeatureSource(reader, "pooled", 64, max_ram=400_000)
        assert source.streamed
        streamed = fit_logreg(config, source, reader.task, CPU)
    for name, tensor in ram.state_dict.items():
        torch.testing.assert_close(streamed.state_dict[name], tensor, rtol=0, atol=0)
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (ram, streamed)]
    assert untimed[0] == untimed[1]


def test_multilabel_tasks_fit_one_masked_logistic_regression_per_label(tmp_path):
    """Each label is scikit-learn's binary logistic regression on the rows where it is known (NaN labels left out)."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 300), ("val", 100), ("test", 100)):
        x = rng.normal(size=(n, 12)) * rng.uniform(0.5, 3, 12) + 1.0
        y = (x[:, :3] + rng.normal(size=(n, 3)) > 1.0).astype(np.float32)
        y[::7, 1] = np.nan  # unknown labels, as CheXpert's ignore policy stores them
        splits[split] = (x, y)
    path = write_cache(tmp_path / "m.h5", MULTILABEL, splits)
    with open_cache(path, None, None) as reader:
        result = fit_logreg(TrainConfig(c_grid=(1.0,)), FeatureSource(reader, "pooled", 64), reader.task, CPU)
    (x, known) = standardized(splits)["train"]
    weight = result.state_dict["linear.weight"].numpy()
    for label in range(3):
        rows = ~np.isnan(known[:, label])
        reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=20_000).fit(x[rows], known[rows, label])
        np.testing.assert_allclose(weight[label], reference.coef_[0], atol=2e-3)
    assert 0.5 < result.test_metrics["mean_roc_auc"] <= 1.0 and result.extra["C"] == 1.0


# the ledger config of a linear head trained with the study's recipe, as medfm recorded it before the solver existed
STUDY_RECIPE = {"head": "linear", "feature": "pooled", "lr": 1e-2, "weight_decay": 1e-5, "batch_size": 16, "epochs": 2,
                "warmup_steps": None, "patience": None, "grad_clip": 1.0, "data_seed": 0, "views": 0}


@pytest.mark.parametrize("protocol", ["study", "medfm"])
def test_the_studys_recipe_trains_adamw_and_keeps_its_ledger_key(isolated_outputs, protocol):
    """--protocol study resolves to AdamW; --solver adamw does under medfm: neither records a solver, so their keys are
    the keys of runs recorded before it."""
    path = make_cache(isolated_outputs / "c.h5", tokens=None)
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, protocol=protocol, solver="auto" if protocol == "study" else "adamw")
    assert config.resolved().solver == "adamw"
    with open_cache(path, None, None) as reader:
        record = run_probe(reader, config, console=QUIET).record
        fingerprint = reader.fingerprint
        assert ledger_key(reader, config) == record.config_key
    before = {"stage": "probe", **STUDY_RECIPE, "protocol": protocol}
    assert record.config_key == config_key(before, fingerprint, 0)
    assert "solver" not in record.config and "c_grid" not in record.config
    history = [json.loads(line) for line in Path(record.run_dir, "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2] and all("lr" in row for row in history)  # the epoch loop ran


def test_an_lbfgs_run_records_its_solver_and_grid_not_the_adamw_settings_it_never_used(isolated_outputs):
    path = make_cache(isolated_outputs / "c.h5", tokens=None)
    with open_cache(path, None, None) as reader:
        first = run_probe(reader, TrainConfig(), console=QUIET)
        again = run_probe(reader, TrainConfig(lr=1e-2, epochs=5, solver="lbfgs"), console=QUIET)  # the same fit
    assert again.skipped and again.record.id == first.record.id
    assert first.record.config == {"head": "linear", "feature": "pooled", "protocol": "medfm", "solver": "lbfgs",
                                   "c_grid": list(C_GRID), "head_init": ""}
    assert first.record.throughput > 0 and not any(p.name.startswith("events.out") for p in Path(first.record.run_dir).iterdir())


def test_probe_eval_of_the_stored_head_gives_the_runs_own_test_logits_and_score(isolated_outputs, monkeypatch):
    """The standardization lives in the head's buffers: `probe eval` on the run's cache gives its stored test logits."""
    from probe.evaluate import head_outputs, load_run

    path = digits_cache(isolated_outputs / "digits.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path)], monkeypatch)
    assert code == 0, err
    assert "logistic regression on standardized features, L-BFGS" in " ".join((out + err).split())
    (run,) = Ledger().rows()
    code, out, err = run_main(main, ["eval", str(run.id)], monkeypatch)
    assert code == 0, err
    (scored,) = Ledger().evaluations()
    assert scored.metrics == run.test_metrics and scored.score == run.test_primary
    stored = load_predictions(run.run_dir, "test")
    with open_cache(path, None, None) as reader:
        labels, logits = head_outputs(load_run(Ledger(), str(run.id)), reader, device="cpu")
    np.testing.assert_array_equal(logits, stored.logits)
    np.testing.assert_array_equal(labels, stored.labels)


def test_a_c_at_the_edge_of_the_grid_is_said_and_recorded_not_flagged_late(isolated_outputs, monkeypatch):
    path = make_cache(isolated_outputs / "c.h5", tokens=None)
    with open_cache(path, None, None) as reader:
        config = TrainConfig(c_grid=(1e-4, 1e-3))  # two values: the chosen C is at one edge
        said = io.StringIO()
        record = run_probe(reader, config, console=Console(file=said, width=400)).record
    metrics = json.loads(Path(record.run_dir, "metrics.json").read_text())
    assert metrics["C_at_edge"] and metrics["C"] in (1e-4, 1e-3) and not metrics["late_best"] and not record.late_best
    assert "is at the edge of the grid (0.0001..0.001)" in said.getvalue()


def test_a_sweep_of_lbfgs_heads_fits_each_seed_once_and_says_the_lr_grid_does_not_apply(isolated_outputs, monkeypatch):
    path = make_cache(isolated_outputs / "c.h5", tokens=None)
    code, out, err = run_main(main, ["sweep", "--cache", str(path), "--lr", "1e-3,1e-2", "--weight-decay", "0,1e-4",
                                     "--seed", "0,1"], monkeypatch)
    assert code == 0, err
    said = " ".join((out + err).split())
    assert said.count("the --lr and --weight-decay grid does not apply") == 1
    assert "sweep of 2 configurations" in said and "L-BFGS, C on validation, mean over 2 seeds (0, 1)" in said
    rows = Ledger().rows()
    assert sorted(r.seed for r in rows) == [0, 1] and {r.config["solver"] for r in rows} == {"lbfgs"}


def test_a_curve_fits_lbfgs_heads_on_each_subset(isolated_outputs, monkeypatch):
    make_cache(isolated_outputs / "features" / "deit" / "demo-aaaaaaaaaaaa.h5", tokens=None, separation=1.5)
    code, out, err = run_main(main, ["curve", "--backbone", "deit", "--dataset", "demo", "--fractions", "0.25,1", "--repeats", "2"],
                              monkeypatch)
    assert code == 0, err
    rows = Ledger().rows()
    assert len(rows) == 4 and {r.config["solver"] for r in rows} == {"lbfgs"}
    subsets = [r for r in rows if "train_subset" in r.config]
    assert len(subsets) == 2 and {r.config["train_subset"]["amount"] for r in subsets} == {0.25}
    assert all(r.throughput and r.test_primary > 0.25 for r in rows)


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "--solver", "newton"], "unknown solver 'newton'; choose one of: auto, lbfgs, adamw"),
    (["sweep", "--solver", "newton"], "unknown solver 'newton'"),
    (["curve", "--solver", "newton", "--backbone", "deit", "--dataset", "demo"], "unknown solver 'newton'"),
    (["run", "--cache", "CACHE", "--solver", "lbfgs", "--protocol", "study"], "--solver lbfgs is not the study's recipe"),
    (["run", "--cache", "CACHE", "--solver", "lbfgs", "--head", "deit"], "--solver lbfgs fits a linear head"),
    (["run", "--cache", "CACHE", "--solver", "lbfgs", "--views", "2"], "--solver lbfgs fits the cache's eval view"),
])
def test_a_bad_solver_is_one_line_and_exit_2(isolated_outputs, monkeypatch, args, fragment):
    path = make_cache(isolated_outputs / "c.h5")
    code, _, err = run_main(main, [str(path) if a == "CACHE" else a for a in args], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
    assert Ledger().rows() == []


NEWTON = """
import sys
from probe.cli import main
sys.argv = ["prog", "run", "--solver", "newton"]
try:
    main()
except SystemExit as exit_:
    assert exit_.code == 2, exit_.code
assert "torch" not in sys.modules
print("no torch")
"""


def test_an_unknown_solver_is_refused_before_torch_is_imported():
    proc = subprocess.run([sys.executable, "-c", NEWTON], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no torch", proc.stderr
    assert proc.stderr.strip() == "error: unknown solver 'newton'; choose one of: auto, lbfgs, adamw"
