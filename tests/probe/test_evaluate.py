"""`probe eval`: a saved head scored on its own cache reproduces its run's test metrics exactly; on corrupted views and
other datasets it is scored through the same code path, recorded once per (run, cache), and every bad input is one line."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from common.errors import MedfmError
from ledger.predictions import load_predictions
from ledger.store import Ledger
from probe.cli import main
from probe.evaluate import apply_pairing, pair_labels
from scoring.metrics import compute_metrics
from tests.ledgers import train
from tests.probe.caches import DERM, SETTINGS, clean_cache, derived, view
from tests.tiny import MULTICLASS, MULTILABEL, QUIET, run_main


@pytest.mark.parametrize("config", [{"standardize": True}, {"head": "deit", "feature": "tokens", "head_depth": 1,
                                                            "head_preset": "deit-t", "head_weights": "random"}])
def test_eval_on_the_runs_own_cache_reproduces_its_stored_test_metrics_exactly(isolated_outputs, monkeypatch, config):
    run_id = train(clean_cache(isolated_outputs), **config)
    code, out, err = run_main(main, ["eval", str(run_id)], monkeypatch)
    assert code == 0, err
    (run,) = Ledger().rows()
    (scored,) = Ledger().evaluations()
    assert scored.metrics == run.test_metrics  # every metric, bit for bit: the same head through the same code path
    assert scored.score == run.test_primary and scored.scored_rows == 48 and scored.dropped_rows == 0
    assert (scored.run_id, scored.dataset_id, scored.corruption_kind) == (run_id, run.dataset_id, "")
    assert f"accuracy {run.test_primary:.4f} over 48 rows" in " ".join(out.split())
    code, _, err = run_main(main, ["eval", run.run_dir], monkeypatch)  # the run named by its folder; scored again: replaced
    assert code == 0, err
    assert [e.metrics for e in Ledger().evaluations()] == [run.test_metrics]


def test_corrupted_views_are_each_scored_and_recorded_once_per_run_and_cache(isolated_outputs, monkeypatch):
    clean = clean_cache(isolated_outputs)
    run_id = train(clean, standardize=True)
    views = [view(clean, "gaussian_noise", 1, 0.2), view(clean, "gaussian_noise", 5, 3.0), view(clean, "motion_blur", 2, 1.0)]
    derived(clean, clean.with_name("demo-fedcba987654.h5"))  # another cache of the folder, not of the family
    for _ in range(2):  # scored twice: still one row per view
        code, out, err = run_main(main, ["eval", str(run_id), "--corrupted"], monkeypatch)
        assert code == 0, err
    found = Ledger().evaluations()
    assert sorted((e.corruption_kind, e.corruption_severity, e.cache) for e in found) == \
        sorted((k, s, str(p)) for (k, s), p in zip([("gaussian_noise", 1), ("gaussian_noise", 5), ("motion_blur", 2)], views, strict=True))
    (run,) = Ledger().rows()
    stored = load_predictions(run.run_dir, "test")
    severe = next(e for e in found if e.corruption_severity == 5)
    assert severe.score < run.test_primary  # heavy noise costs accuracy
    said = " ".join(out.split())
    assert "+gaussian_noise-5.h5 (gaussian_noise, severity 5): accuracy" in said and "relative drop" in said
    assert len(stored.ids) == severe.scored_rows


def test_a_view_made_with_other_feature_settings_is_refused_in_one_line(isolated_outputs, monkeypatch):
    clean = clean_cache(isolated_outputs)
    run_id = train(clean)
    other = derived(clean, isolated_outputs / "other.h5", settings={"precision": "bfloat16", "transform": {**SETTINGS["transform"], "size": 64}})
    code, _, err = run_main(main, ["eval", str(run_id), "--cache", str(other)], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: other.h5 holds features made otherwise"), err
    assert "precision: fp32 vs bfloat16" in lines[0] and "transform.size: 32 vs 64" in lines[0]
    # another dataset extracted alike is fine: the dataset's own settings do not count
    moved = derived(clean, isolated_outputs / "moved.h5", settings={"root": "/elsewhere", "dataset_options": {"per_class": 3}})
    code, _, err = run_main(main, ["eval", str(run_id), "--cache", str(moved)], monkeypatch)
    assert code == 0, err
    assert len(Ledger().evaluations()) == 1


def test_another_dataset_is_scored_through_its_label_map_and_unmapped_rows_need_allow_unmapped(isolated_outputs, monkeypatch):
    clean = clean_cache(isolated_outputs)
    run_id = train(clean, standardize=True)
    as_derm = {"relabel": lambda y: np.minimum(y, 2), "dataset": DatasetInfo("derm"), "task": DERM}  # a, b -> A, B; c, d -> C
    plain = derived(clean, isolated_outputs / "derm.h5", settings={"dataset": "derm", "root": "/data/derm"}, **as_derm)
    code, _, err = run_main(main, ["eval", str(run_id), "--cache", str(plain)], monkeypatch)
    assert code == 2 and "their classes differ and the cache has no label map of derm onto demo" in err and len(err.splitlines()) == 1
    mapped = derived(clean, isolated_outputs / "derm-mapped.h5", settings={"dataset": "derm", "root": "/data/derm2"},
                     label_maps={"demo": {"A": "a", "B": "b", "C": None}}, **as_derm)
    code, _, err = run_main(main, ["eval", str(run_id), "--cache", str(mapped)], monkeypatch)
    assert code == 2 and "leaves C without a counterpart; pass --allow-unmapped" in err and len(err.splitlines()) == 1
    assert Ledger().evaluations() == []
    code, out, err = run_main(main, ["eval", str(run_id), "--cache", str(mapped), "--allow-unmapped"], monkeypatch)
    assert code == 0, err
    (scored,) = Ledger().evaluations()
    stored = load_predictions(Ledger().rows()[0].run_dir, "test")  # the same features, so the run's own test logits
    keep = stored.labels < 2
    assert scored.dropped_rows == int((~keep).sum()) > 0 and scored.scored_rows == int(keep.sum())
    assert scored.metrics["accuracy"] == compute_metrics(MULTICLASS, stored.labels[keep], stored.logits[keep])["accuracy"]
    assert scored.metrics["label_map"] == {"unmapped": ["C"], "unscored": []}
    assert (scored.dataset, scored.dataset_label) == ("derm", "derm") and scored.dataset_id != scored.trained_dataset_id
    assert f"{scored.dropped_rows} test rows of C dropped" in " ".join(out.split())


def test_a_multilabel_head_is_scored_on_the_partner_labels_its_own_labels_map_to():
    head = MULTILABEL  # x, y, z, trained on "chexpert"
    meta = CacheMeta(BackboneInfo("deit"), DatasetInfo("mimic"), Task("multilabel", ("p", "q", "r")), layers=(0,), num_layers=1,
                     label_maps={"chexpert": {"p": "y", "q": "x", "r": None}})
    with pytest.raises(MedfmError, match="leaves r without a counterpart; pass --allow-unmapped .*labels are ignored"):
        pair_labels(head, "chexpert", meta, False)
    mapping = pair_labels(head, "chexpert", meta, True)
    assert mapping.task.class_names == ("y", "x") and mapping.unscored == ("z",) and mapping.unmapped == ("r",)
    labels, logits = np.arange(12.0).reshape(4, 3), -np.arange(12.0).reshape(4, 3)
    paired_labels, paired_logits, dropped = apply_pairing(mapping, labels, logits)
    assert np.array_equal(paired_labels, labels[:, [0, 1]]) and np.array_equal(paired_logits, logits[:, [1, 0]]) and dropped == 0
    with pytest.raises(MedfmError, match="predicts a multilabel task and the cache's demo is multiclass"):
        pair_labels(head, "chexpert", CacheMeta(BackboneInfo("deit"), DatasetInfo("demo"), MULTICLASS, layers=(0,), num_layers=1), True)
    stranger = replace(meta, label_maps={"chexpert": {"p": "w"}})
    with pytest.raises(MedfmError, match="names w, not classes of chexpert"):
        pair_labels(head, "chexpert", stranger, True)


@pytest.mark.parametrize(("args", "fragment"), [
    (["eval", "99"], "no run 99 in the ledger"),
    (["eval", "/nowhere/run"], "no run /nowhere/run in the ledger"),
    (["eval", "1", "--corrupted"], "no corrupted views of demo-0123456789ab.h5 beside it"),
    (["eval", "1", "--cache", "/nowhere.h5"], "cache file /nowhere.h5 does not exist"),
    (["report", "--evaluations", "some"], "--evaluations must be one of all, robustness, transfer, none"),
])
def test_a_mistake_is_one_line_and_exit_2(isolated_outputs, monkeypatch, args, fragment):
    train(clean_cache(isolated_outputs))
    code, _, err = run_main(main, args, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
    assert Ledger().evaluations() == []


def test_a_ledger_from_before_evaluations_gains_the_table_and_keeps_its_runs(isolated_outputs):
    train(clean_cache(isolated_outputs))
    path = Ledger().path
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE evaluations")
    assert len(Ledger().rows()) == 1 and Ledger().evaluations() == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'evaluations'").fetchone() == (1,)


def test_end_to_end_extract_corrupt_then_eval_then_the_report_shows_the_drop(isolated_outputs, monkeypatch):
    from extract.corruptions import parse_corruptions
    from extract.runner import ExtractConfig, extract
    from report.table import make_report
    from tests.tiny import TINY_SIZE, TINY_VIT_1

    config = ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=TINY_SIZE, batch_size=64, workers=0,
                           overrides=TINY_VIT_1, dataset_options={"per_class": 10}, tokens=False,
                           corrupt=parse_corruptions("gaussian_noise:5,contrast:1"))
    result = extract(config, QUIET)
    run_id = train(result.path, standardize=True)
    code, out, err = run_main(main, ["eval", str(run_id), "--corrupted"], monkeypatch)
    assert code == 0, err
    (run,) = Ledger().rows()
    found = Ledger().evaluations()
    assert sorted((e.corruption_kind, e.corruption_severity) for e in found) == [("contrast", 1), ("gaussian_noise", 5)]
    assert all(e.dataset_id == run.dataset_id and e.scored_rows == len(load_predictions(run.run_dir).ids) for e in found)
    robustness = make_report(Ledger()).evaluations.robustness
    assert list(robustness.columns) == ["contrast", "gaussian_noise", "mean"] and len(robustness) == 1
