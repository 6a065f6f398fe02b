"""The SQLite ledger: rows round-trip, skip-if-done keys, filters, and several writers."""

from __future__ import annotations

import math

import pytest

from ledger.records import RunRecord, config_key
from ledger.store import Ledger


def record(key: str, **kw) -> RunRecord:
    base = dict(stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear",
                config={"lr": 1e-4}, config_key=key, cache_fingerprint="f" * 64, seed=0, primary_metric="accuracy",
                val_score=0.5, test_metrics={"accuracy": 0.75, "roc_auc": float("nan"), "warnings": ["x"]},
                test_primary=0.75, backbone_random=True)
    return RunRecord(**{**base, **kw})


def test_ledger_round_trips_a_row_and_finds_it_by_config_key(tmp_path):
    ledger = Ledger(tmp_path / "runs" / "results.sqlite")
    rid = ledger.add(record("k1"))
    found = ledger.find("k1")
    assert found is not None and found.id == rid
    assert found.config == {"lr": 1e-4} and found.backbone_random is True and found.head_random is False
    assert math.isnan(found.test_metrics["roc_auc"]) and found.test_metrics["warnings"] == ["x"]
    assert found.code_version and found.created
    assert ledger.find("other") is None


def test_ledger_filters_rows_by_columns_and_reopens_from_disk(tmp_path):
    path = tmp_path / "results.sqlite"
    Ledger(path).add(record("a", backbone="deit"))
    Ledger(path).add(record("b", backbone="dinov2", dataset="aptos2019"))
    ledger = Ledger(path)
    assert [r.config_key for r in ledger.rows()] == ["a", "b"]
    assert [r.config_key for r in ledger.rows(backbone="dinov2")] == ["b"]
    assert [r.config_key for r in ledger.rows(dataset=["demo", "aptos2019"])] == ["a", "b"]
    assert ledger.rows(dataset=[]) == []


def test_config_key_changes_with_config_fingerprint_and_seed():
    key = config_key({"lr": 1e-4}, "fp", 0)
    assert key == config_key({"lr": 1e-4}, "fp", 0)
    assert len({key, config_key({"lr": 1e-3}, "fp", 0), config_key({"lr": 1e-4}, "fp2", 0), config_key({"lr": 1e-4}, "fp", 1)}) == 4


def test_ledger_defaults_under_medfm_output(isolated_outputs):
    assert Ledger().path == isolated_outputs / "runs" / "results.sqlite"


def test_ledger_accepts_the_scenarios_and_partial_unfreezing_and_refuses_anything_else(tmp_path):
    ledger = Ledger(tmp_path / "results.sqlite")
    for scenario in ("frozen-linear", "unfrozen-deit", "last2-linear", "last12-deit"):
        ledger.add(record(scenario, scenario=scenario))
    for bad in ("partial-linear", "last0-linear", "frozen-mlp", "unfrozen-linear-x"):
        with pytest.raises(ValueError, match="scenario"):
            ledger.add(record(bad, scenario=bad))
    assert len(ledger.rows()) == 4


def test_a_ledger_of_the_first_release_is_migrated_to_separate_backbone_and_head_flags(tmp_path):
    """Its one `random_weights` flag meant the backbone in probe rows and "backbone or head" in finetune rows."""
    import json
    import sqlite3

    path = tmp_path / "results.sqlite"
    columns = ", ".join(f"{c} TEXT" for c in ("stage", "scenario", "backbone", "dataset", "head", "config", "config_key",
                                              "cache_fingerprint", "primary_metric", "test_metrics", "code_version", "run_dir", "created"))
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns}, seed INTEGER, val_score REAL, "
                   "test_primary REAL, random_weights INTEGER NOT NULL, train_seconds REAL, total_seconds REAL)")
        for key, stage, weights, random in (("p", "probe", {}, 1), ("f-head", "finetune", {"kind": "pretrained"}, 1),
                                            ("f-both", "finetune", {"kind": "random"}, 1), ("f-none", "finetune", {"kind": "pretrained"}, 0)):
            db.execute("INSERT INTO runs (stage, scenario, backbone, dataset, head, config, config_key, primary_metric, test_metrics, "
                       "created, seed, random_weights) VALUES (?, 'frozen-deit', 'sam', 'demo', 'deit', ?, ?, 'accuracy', '{}', 'x', 0, ?)",
                       (stage, json.dumps({"weights": weights}), key, random))
    ledger = Ledger(path)
    flags = {r.config_key: (r.backbone_random, r.head_random) for r in ledger.rows()}
    assert flags == {"p": (True, False), "f-head": (False, True), "f-both": (True, False), "f-none": (False, False)}
    ledger.add(record("new"))  # the rewritten table takes new rows
    assert len(Ledger(path).rows()) == 5


def test_a_corrupt_ledger_is_one_clear_error(tmp_path):
    from common.errors import MedfmError

    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MedfmError, match=r"is damaged \(file is not a database\); `probe ledger check --ledger .*` lists the damage"):
        Ledger(path)


def test_a_ledger_without_the_dataset_identity_columns_gets_them_with_defaults_for_its_rows(tmp_path):
    """A ledger of the previous release (two random flags, no dataset identity or late flag) opens, and its rows read
    with the dataset name alone as their identity."""
    import sqlite3

    from ledger.records import unrecorded_identity

    path = tmp_path / "results.sqlite"
    text = ", ".join(f"{c} TEXT" for c in ("stage", "scenario", "backbone", "dataset", "head", "config", "config_key", "cache_fingerprint",
                                          "primary_metric", "test_metrics", "code_version", "run_dir", "created"))
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, {text}, seed INTEGER, val_score REAL, test_primary REAL, "
                   "backbone_random INTEGER NOT NULL, head_random INTEGER NOT NULL, train_seconds REAL, total_seconds REAL)")
        db.execute("INSERT INTO runs (stage, scenario, backbone, dataset, head, config, config_key, seed, primary_metric, "
                   "test_metrics, backbone_random, head_random, created) VALUES ('probe', 'frozen-linear', 'deit', 'aptos2019', "
                   "'linear', '{}', 'old', 0, 'accuracy', '{}', 0, 0, 'x')")
    ledger = Ledger(path)
    (row,) = ledger.rows()
    assert (row.dataset_id, row.dataset_label, row.dataset_inputs, row.late_best) == (
        unrecorded_identity("aptos2019").id, "aptos2019", {}, False)
    ledger.add(record("new", late_best=True))
    assert [r.late_best for r in Ledger(path).rows()] == [False, True]


def test_dataset_identity_is_the_content_and_keeps_the_inputs_beside_it_and_tags_own_data():
    from ledger.records import dataset_identity

    def ident(name="aptos2019", **kw):
        base = dict(root="/data/a", manifest_hash="m", options={}, image_size=224, channels=3, norm="model", interpolation="bicubic")
        return dataset_identity(name, **{**base, **kw})

    same = ident()
    assert same == ident() and same.label == "aptos2019" and len(same.id) == 12
    others = [ident(root="/data/b"), ident(manifest_hash="n"), ident(options={"policy": "ones"})]
    assert len({same.id, *(o.id for o in others)}) == 4  # other data: another column
    fed = [ident(image_size=112), ident(channels=1), ident(norm="study"), ident(interpolation="bilinear")]
    assert {f.id for f in fed} == {same.id}  # the same data fed otherwise: the same column, the inputs kept beside
    assert [f.inputs["image_size"] for f in fed] == [112, 224, 224, 224] and fed[2].inputs["norm"] == "study"
    a, b = ident("csv", root="/data/a"), ident("csv", root="/data/b")
    assert a.label.startswith("csv:") and len(a.label) == 8 and a.label != b.label
    assert ident("csv", root="/data/a", image_size=112).label == a.label  # the tag names the images, not the inputs


def test_late_best_is_a_best_epoch_in_the_last_tenth():
    from ledger.records import late_best

    assert [late_best(b, 100) for b in (90, 91, 100)] == [False, True, True]
    assert [late_best(b, 30) for b in (27, 28)] == [False, True]
    assert late_best(1, 1) and late_best(5, 5) and not late_best(4, 5)


def test_the_best_configuration_is_the_best_mean_validation_over_its_seeds_not_the_best_single_run():
    from ledger.records import best_configuration

    lucky = [record(f"a{s}", config={"lr": 1e-3}, seed=s, val_score=v) for s, v in enumerate((0.95, 0.40, 0.45))]  # mean 0.60
    steady = [record(f"b{s}", config={"lr": 1e-4}, seed=s, val_score=v) for s, v in enumerate((0.70, 0.72, 0.68))]  # mean 0.70
    undefined = [record("c", config={"lr": 1e-2}, val_score=float("nan"))]
    assert best_configuration(lucky + steady + undefined) == steady
    assert best_configuration(undefined) == undefined and best_configuration([]) == []


def test_a_row_written_while_another_process_holds_the_lock_is_kept_and_merged_never_lost(tmp_path, monkeypatch, capsys):
    """A backup or an open sqlite3 shell holding the write lock past the wait: the trained run's row goes to the pending
    folder (said on stderr), and the next opening of the ledger merges it, once."""
    import sqlite3

    from ledger.records import RunRecord
    from ledger.store import Ledger

    monkeypatch.setattr(Ledger, "LOCK_WAIT", 0.2)
    ledger = Ledger(tmp_path / "results.sqlite")
    record = RunRecord(stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear", config={"lr": 1e-4},
                       config_key="k" * 64, cache_fingerprint="f", seed=0, primary_metric="accuracy", val_score=0.5,
                       test_metrics={"accuracy": 0.6}, test_primary=0.6, backbone_random=True)
    holder = sqlite3.connect(tmp_path / "results.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    assert ledger.add(record) is None
    assert "is locked by another process" in capsys.readouterr().err
    (pending,) = ledger.pending.glob("*.json")
    assert Ledger(tmp_path / "results.sqlite").rows() == []  # still locked: the row waits, nothing lost, nothing raised
    assert pending.exists()
    holder.execute("COMMIT")
    holder.close()
    (row,) = Ledger(tmp_path / "results.sqlite").rows()  # the next opening merges it
    assert (row.config_key, row.test_primary) == ("k" * 64, 0.6) and not pending.exists()
    assert Ledger(tmp_path / "results.sqlite").merge_pending() == 0 and len(Ledger(tmp_path / "results.sqlite").rows()) == 1


def test_a_ledger_that_cannot_be_opened_or_placed_is_one_line(tmp_path):
    from common.errors import MedfmError

    (tmp_path / "a-folder.sqlite").mkdir()
    with pytest.raises(MedfmError, match=r"cannot open the results ledger .*a-folder.sqlite \(unable to open database file\)"):
        Ledger(tmp_path / "a-folder.sqlite")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(MedfmError, match=r"cannot create the folder of the results ledger .*a-file/results.sqlite"):
        Ledger(tmp_path / "a-file" / "results.sqlite")
    with pytest.raises(MedfmError, match="no results ledger at"):
        Ledger(tmp_path / "missing.sqlite", create=False)
    assert not (tmp_path / "missing.sqlite").exists()
