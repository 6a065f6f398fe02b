"""Faults of the results ledger, through the real `probe` command line: damage SQLite finds only when a query reaches it,
a lock held past the wait, a read-only folder, a mistyped --ledger. Each is one `error:` line that names the ledger and
a way out that loses nothing while another process writes to it; `probe ledger check` and `recover` find and mend."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from ledger.store import Ledger, pending_folder
from probe.cli import main
from tests.faults.broken import damage, one_line, read_only, trained
from tests.tiny import run_main

EPOCHS = ["--epochs", "2", "--solver", "adamw", "--batch-size", "16", "--lr", "0.01"]  # the settings of `trained`'s runs


def commands(cache: Path, ids: list[int]) -> dict[str, list[str]]:
    """Every probe command that queries the default ledger, as a user types it (run and sweep: runs the ledger holds)."""
    a, b = map(str, ids)
    return {"run": ["run", "--cache", str(cache), "--seed", "0", *EPOCHS],
            "sweep": ["sweep", "--cache", str(cache), "--seed", "0,1", *EPOCHS],
            "report": ["report"], "eval": ["eval", a], "compare": ["compare", a, b],
            "curve": ["curve", "--cache", str(cache), "--fractions", "0.5", "--repeats", "1"]}  # the configuration `report` chose


@pytest.mark.parametrize(("name", "reached_by"), [("runs", ("run", "sweep", "report", "eval", "compare", "curve")),
                                                  ("runs_config_key", ("run", "sweep"))])
def test_damage_found_late_is_one_line_from_every_command_that_reaches_it(name, reached_by, isolated_outputs, monkeypatch):
    """N7: the runs table's or its index's b-tree damaged; before, only opening the ledger said it in one line."""
    cache, ids = trained(isolated_outputs)
    ledger = isolated_outputs / "runs" / "results.sqlite"
    damage(ledger, name)
    for command in reached_by:
        line = one_line(*run_main(main, commands(cache, ids)[command], monkeypatch)[::2], command)
        assert f"the results ledger {ledger} is damaged (database disk image is malformed)" in line, command
        assert f"probe ledger recover --ledger {ledger}" in line and "move it aside" not in line, command


def test_a_run_trained_while_the_ledger_is_damaged_keeps_its_row_for_recover(isolated_outputs, monkeypatch):
    """A new run finds nothing to skip (the intact index has no such key), trains, and cannot write its row: the row is
    kept beside the ledger, said in a note, and `probe ledger recover` puts it into the copy."""
    cache, _ = trained(isolated_outputs)
    ledger = isolated_outputs / "runs" / "results.sqlite"
    damage(ledger, "runs")
    code, _, err = run_main(main, ["run", "--cache", str(cache), "--seed", "5", *EPOCHS], monkeypatch)
    assert code == 0 and f"note: the results ledger {ledger} is damaged; this run's row is kept in" in " ".join(err.split())
    code, out, _ = run_main(main, ["ledger", "recover"], monkeypatch)
    assert code == 0 and "with 2 run(s) (ids 1-2), 0 evaluation(s) and 1 pending row(s)" in " ".join(out.split())
    (copy,) = ledger.parent.glob("results.recovered-*.sqlite")
    assert sorted(r.seed for r in Ledger(copy).rows()) == [0, 1, 5]


def test_ledger_check_lists_the_damage_and_recover_writes_every_row_to_a_copy_leaving_the_file(isolated_outputs, monkeypatch):
    cache, ids = trained(isolated_outputs)
    ledger = isolated_outputs / "runs" / "results.sqlite"
    code, out, _ = run_main(main, ["ledger", "check"], monkeypatch)
    assert code == 0 and out.strip() == f"{ledger}: ok"
    damage(ledger, "runs")
    damaged = ledger.read_bytes()
    code, out, _ = run_main(main, ["ledger", "check", "--ledger", str(ledger)], monkeypatch)
    assert code == 1 and f"{ledger}: database disk image is malformed" in out and "probe ledger recover" in out
    code, out, _ = run_main(main, ["ledger", "recover", "--ledger", str(ledger)], monkeypatch)
    said = " ".join(out.split())
    (copy,) = ledger.parent.glob("results.recovered-*.sqlite")
    assert code == 0 and f"wrote {copy} with 2 run(s) (ids 1-2)" in said and f"mv {copy} {ledger}" in said
    assert ledger.read_bytes() == damaged  # the damaged file is kept as it was
    assert [r.id for r in Ledger(copy).rows()] == ids
    code, out, _ = run_main(main, ["compare", *map(str, ids), "--ledger", str(copy), "--boot", "50"], monkeypatch)
    assert code in (0, 1) and "A - B in accuracy" in " ".join(out.split())  # the copy answers for the same run ids


def test_recover_merges_the_rows_a_locked_ledger_kept_pending(isolated_outputs, monkeypatch):
    """A row kept aside while another process held the lock goes in with `probe ledger recover`, once the lock is free."""
    trained(isolated_outputs, runs=1)
    path = isolated_outputs / "runs" / "results.sqlite"
    monkeypatch.setattr(Ledger, "LOCK_WAIT", 0.2)
    ledger = Ledger(path)
    row = ledger.rows()[0]
    row.created = "2026-01-01T00:00:00"  # another run of the same key, later
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a backup or an open sqlite3 shell, writing
    assert ledger.add(row) is None
    holder.execute("COMMIT")
    holder.close()
    assert len(list(pending_folder(path).glob("*.json"))) == 1
    code, out, _ = run_main(main, ["ledger", "recover"], monkeypatch)
    assert code == 0 and "is intact (integrity_check: ok); merged 1 pending row(s)" in " ".join(out.split())
    assert len(Ledger(path).rows()) == 2 and not list(pending_folder(path).glob("*.json"))


@pytest.mark.parametrize("command", [["report"], ["run", "--seed", "5", *EPOCHS]])
def test_a_ledger_locked_past_the_wait_is_one_line_that_says_to_wait_not_to_move_it(command, isolated_outputs, monkeypatch):
    """Unclear 1: the advice was to move the ledger aside, which loses the rows of the process writing it."""
    cache, _ = trained(isolated_outputs, runs=1)
    ledger = isolated_outputs / "runs" / "results.sqlite"
    monkeypatch.setattr(Ledger, "LOCK_WAIT", 0.2)
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # readers wait too
    try:
        args = command + (["--cache", str(cache)] if command[0] == "run" else [])
        line = one_line(*run_main(main, args, monkeypatch)[::2])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert f"the results ledger {ledger} stayed locked by another process" in line and "wait for it to finish" in line
    assert "move it aside" not in line


def test_a_read_only_output_folder_is_one_line_for_run_eval_and_report(isolated_outputs, monkeypatch, tmp_path):
    """N10: the lock file of `probe run`, the evaluation row of `probe eval`, the files of `probe report`."""
    cache, ids = trained(isolated_outputs, runs=1)
    elsewhere = shutil.copy(cache, tmp_path / "elsewhere.h5")  # a cache outside the read-only folder
    with read_only(isolated_outputs):
        line = one_line(*run_main(main, ["run", "--cache", elsewhere, "--seed", "5", *EPOCHS], monkeypatch)[::2])
        assert "cannot create the lock file" in line and "Read-only file system" in line
        line = one_line(*run_main(main, ["eval", str(ids[0]), "--cache", elsewhere], monkeypatch)[::2])
        assert "attempt to write a readonly database" in line and "make both writable" in line
        line = one_line(*run_main(main, ["report"], monkeypatch)[::2])
        assert f"cannot write into {isolated_outputs / 'reports'}" in line and "read-only" in line


def test_report_on_a_ledger_in_a_missing_folder_creates_nothing(tmp_path, monkeypatch):
    """Unclear 5: it made both folders and an empty ledger, then said the ledger holds no runs."""
    typo = tmp_path / "typo_dir" / "deeper" / "results.sqlite"
    for command in (["report"], ["compare", "1", "2"], ["eval", "1"]):
        line = one_line(*run_main(main, [*command, "--ledger", str(typo)], monkeypatch)[::2])
        assert f"no results ledger at {typo}" in line
    assert not (tmp_path / "typo_dir").exists()
