"""`ledger.repair`: the integrity check, and the recovered copy of a damaged ledger read off its pages where SQLite cannot
walk a table's b-tree: rows spread over many pages, rows longer than a page (overflow chains), a damaged interior page,
a leaf page whose header is damaged, a leaf page lost, evaluations replaced by a later one."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from common.errors import MedfmError
from ledger.records import EvaluationRecord, RunRecord
from ledger.repair import check, recover
from ledger.store import Ledger, LedgerError


def record(i: int, long: bool = False) -> RunRecord:
    return RunRecord(stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear",
                     config={"lr": 1e-4, "note": "x" * (9000 if long else i)}, config_key=f"k{i:04d}", cache_fingerprint="f",
                     seed=i, primary_metric="accuracy", val_score=i / 100, test_metrics={"accuracy": 0.5, "roc_auc": float("nan")},
                     test_primary=0.5, backbone_random=i % 2 == 0)


def evaluation(run: int, score: float) -> EvaluationRecord:
    return EvaluationRecord(run_id=run, run_key=f"k{run:04d}", trained_dataset_id="d", dataset="demo", dataset_id="d",
                            dataset_label="demo", corruption_kind="", corruption_severity=None, cache="c.h5", cache_fingerprint="f",
                            primary_metric="accuracy", score=score, metrics={"accuracy": score}, scored_rows=10)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """60 runs over many pages, every tenth longer than a page (an overflow chain), and two evaluations, one replaced."""
    ledger = Ledger(tmp_path / "results.sqlite")
    for i in range(60):
        ledger.add(record(i, long=i % 10 == 3))
    ledger.add_evaluation(evaluation(1, 0.1))
    ledger.add_evaluation(evaluation(2, 0.2))
    ledger.add_evaluation(evaluation(1, 0.3))  # replaces the first
    return ledger


def pages(path: Path) -> tuple[int, int, dict[int, int]]:
    """(page size, root page of the runs table, {leaf page: rows on it}), as SQLite's dbstat table lists them."""
    with closing(sqlite3.connect(path)) as db:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
        leaves = dict(db.execute("SELECT pageno, ncell FROM dbstat WHERE name = 'runs' AND pagetype = 'leaf' ORDER BY pageno"))
    return size, root, leaves


def overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)


def rows(path: Path) -> list[str]:
    return [str(r) for r in Ledger(path).rows()]


def test_an_intact_ledger_checks_ok_and_recover_only_merges(ledger: Ledger) -> None:
    assert check(ledger.path) == []
    done = recover(ledger.path)
    assert done.copy is None and "is intact (integrity_check: ok); no row was pending" in done.line()


def test_damage_to_the_runs_tables_interior_page_loses_no_row(ledger: Ledger) -> None:
    """The root of a table of many pages is an interior page: every row sits on intact leaf pages, read off the file."""
    want = rows(ledger.path)
    size, root, leaves = pages(ledger.path)
    assert root not in leaves and len(leaves) > 2
    overwrite(ledger.path, (root - 1) * size, b"\xff" * 12)
    damaged = ledger.path.read_bytes()
    assert check(ledger.path)
    with pytest.raises(LedgerError, match="is damaged"):
        ledger.rows()
    done = recover(ledger.path)
    assert rows(done.copy) == want and ledger.path.read_bytes() == damaged
    assert "wrote" in done.line() and "60 run(s) (ids 1-60), 2 evaluation(s)" in done.line()
    assert [(e.run_id, e.score) for e in Ledger(done.copy).evaluations()] == [(2, 0.2), (1, 0.3)]  # the replaced one stays replaced


def test_a_leaf_page_with_a_damaged_header_gives_its_rows_back_and_a_lost_page_is_counted(ledger: Ledger) -> None:
    want = rows(ledger.path)
    size, _, leaves = pages(ledger.path)
    damaged, lost = list(leaves)[:2]
    overwrite(ledger.path, (damaged - 1) * size, b"\xff" * 12)  # header and first cell pointers: its cells are read by shape
    overwrite(ledger.path, (lost - 1) * size, b"\x00" * size)
    done = recover(ledger.path)
    got = rows(done.copy)
    assert set(got) < set(want) and len(got) == 60 - leaves[lost]
    assert f"; {leaves[lost]} of the 60 run ids it gave out could not be read" in done.line()


def test_a_file_that_is_no_database_checks_as_damaged_and_recovers_nothing_but_its_pending_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not a database" * 300)
    assert check(path) == ["file is not a database"]
    assert "wrote" in recover(path).line() and "with no run, 0 evaluation(s)" in recover(path).line()
    assert len(list(tmp_path.glob("results.recovered-*.sqlite"))) == 2  # a second recovery never overwrites the first


def test_check_of_a_missing_ledger_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="no results ledger at"):
        check(tmp_path / "nothing.sqlite")
