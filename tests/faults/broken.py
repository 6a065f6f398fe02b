"""Broken things for the fault tests: a ledger damaged where SQLite finds it only when a query reaches it, a folder
remounted read-only, runs to break, and the check every fault must pass: one `error:` line, no traceback."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.ledgers import train
from tests.probe.caches import clean_cache


def one_line(code: int, err: str, what: str = "") -> str:
    """The one `error:` line a failed command (`what`, for the failure's message) printed, after checking that it failed
    with that line alone."""
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (what, code, err)
    return lines[0]


def damage(ledger: Path, name: str) -> None:
    """12 bytes over the header of the root page of table or index `name`: SQLite opens the file and finds the damage only
    when a query reaches that b-tree (the attack's N7)."""
    with closing(sqlite3.connect(ledger)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    with open(ledger, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xff" * 12)


def trained(outputs: Path, runs: int = 2) -> tuple[Path, list[int]]:
    """A clean cache under `outputs` and `runs` short AdamW probe runs on it, recorded in the default ledger: (cache, ids)."""
    cache = clean_cache(outputs)
    return cache, [train(cache, solver="adamw", epochs=2, seed=seed) for seed in range(runs)]


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` remounted read-only (a bind mount over itself) for the block; needs root, as CI has."""
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("a read-only bind mount needs root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
