"""Collapsed and chance-level runs (`scoring.health`): flagged in the ledger, said at the end of a run, marked in the report."""

from __future__ import annotations

import sqlite3

import numpy as np

from cache.layout import open_cache
from ledger.records import RunRecord
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.run import run_probe
from report.table import HEALTH_NOTE, build_report, notes
from scoring.health import Health, chance_level, check_run, check_runs
from tests.probe.caches import make_cache
from tests.tiny import BINARY, MULTICLASS


def labels_and_logits(n: int = 200, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n, p=[0.4, 0.2, 0.2, 0.2])
    return y, rng.normal(size=(n, classes))


def test_a_constant_prediction_is_collapsed_and_at_chance():
    y, _ = labels_and_logits()
    constant = np.tile([3.0, 0.0, 0.0, 0.0], (len(y), 1))  # always the majority class 0
    health = check_run(MULTICLASS, y, constant)
    assert health.collapsed and health.chance
    assert "100% of the test predictions are 'a'" in health.message and "not above its chance level" in health.message


def test_a_healthy_run_is_not_flagged_and_a_label_blind_one_is_at_chance():
    y, noise = labels_and_logits()
    healthy = np.eye(4)[y] * 4 + noise  # mostly right, every class predicted
    assert check_run(MULTICLASS, y, healthy) == Health(False, False, "")
    blind = check_run(MULTICLASS, y, noise)  # random logits: no class dominates, accuracy ~1/4, below the majority rate 0.4
    assert not blind.collapsed and blind.chance


def test_chance_levels_per_metric():
    y = np.array([0, 0, 0, 1])
    assert chance_level("accuracy", y) == 0.75  # the majority-class rate, not 1/C
    assert chance_level("macro_recall", y) == 0.5 and chance_level("quadratic_kappa", y) == 0.0
    assert chance_level("roc_auc", y) == 0.5 and chance_level("mean_roc_auc", y) == 0.5


def test_a_run_on_signal_free_features_is_flagged_in_the_ledger_and_warned(isolated_outputs, capsys):
    from rich.console import Console

    noisy = make_cache(isolated_outputs / "noise.h5", separation=0.0, task=BINARY)
    clean = make_cache(isolated_outputs / "clean.h5", separation=3.0, task=BINARY)  # the same fingerprint: another ledger
    console = Console(stderr=True, width=300)
    with open_cache(noisy, None, None) as reader:
        flagged = run_probe(reader, TrainConfig(epochs=5, batch_size=32, lr=1e-2), console=console).record
    warned = capsys.readouterr().err
    with open_cache(clean, None, None) as reader:
        fine = run_probe(reader, TrainConfig(epochs=5, batch_size=32, lr=1e-2), console=console, ledger=Ledger(isolated_outputs / "b.sqlite")).record
    assert flagged.chance and "warning: chance" in warned
    assert not fine.chance and not fine.collapsed and "warning" not in capsys.readouterr().err
    assert [(r.chance, r.collapsed) for r in Ledger().rows()] == [(True, flagged.collapsed)]


def test_old_ledgers_gain_the_flags_unset_and_the_report_marks_flagged_cells(tmp_path):
    path = tmp_path / "results.sqlite"
    ledger = Ledger(path)
    base = dict(stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear", config={},
                cache_fingerprint="f", seed=0, primary_metric="accuracy", val_score=0.5, test_metrics={"accuracy": 0.5},
                test_primary=0.5, backbone_random=False)
    ledger.add(RunRecord(config_key="old", **base))
    with sqlite3.connect(path) as db:  # the ledger as written before the flags existed
        db.execute("ALTER TABLE runs DROP COLUMN collapsed")
        db.execute("ALTER TABLE runs DROP COLUMN chance")
    ledger = Ledger(path)
    (old,) = ledger.rows()
    assert (old.collapsed, old.chance) == (False, False)
    ledger.add(RunRecord(config_key="new", **{**base, "backbone": "dino"}, collapsed=True, chance=True))
    report = build_report(ledger.rows())
    dino = next(k for k in report.table.index if k[0] == "dino")
    deit = next(k for k in report.table.index if k[0] == "deit")
    assert report.cell(dino, "demo").endswith("(n=1, collapsed, chance)") and report.cell(deit, "demo").endswith("(n=1)")
    assert HEALTH_NOTE in notes(report)


def test_runs_checked_together_get_what_each_gets_alone():
    """A sweep checks its heads on resamples drawn once (`check_runs`): the same flags and intervals as one by one."""
    y, noise = labels_and_logits()
    runs = [np.eye(4)[y] * 4 + noise, noise, np.tile([3.0, 0.0, 0.0, 0.0], (len(y), 1))]
    assert check_runs(MULTICLASS, y, runs) == [check_run(MULTICLASS, y, r) for r in runs]
