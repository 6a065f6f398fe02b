"""The results ledger: one SQLite row per training run, shared by probe and finetune.

SQLite, because several processes (sweep workers, a finetune beside a probe) append at once and a
report must read a consistent table. `config_key` hashes what decides a result (stage, config, cache
fingerprint, seed), so a run already in the ledger can be skipped instead of retrained.

Columns mean one thing in both stages: `stage` is probe (heads on cached features) or finetune (live
images); `backbone_random` says the backbone's weights were random, `head_random` that a head meant to
start from pretrained weights (the DeiT head) started random. A ledger written before these two columns
existed is rewritten with them when opened.

What makes results comparable is the data: `dataset_id` is a short hash of the dataset's name, root, options and
split manifest, `dataset_label` its name for a reader (`csv:a1b2` for your own data, whose loader name says
nothing), `dataset_inputs` those and how the backbone was fed them (image size, channels, normalisation,
interpolation). The report makes a column per dataset (`RunRecord.data_id`, which reads the content out of
`dataset_inputs`, so rows recorded when the id hashed the inputs too join their column); how each row's backbone
was fed is a property of the row. `late_best` flags a run
whose best validation epoch fell in the last tenth of its epochs. Rows written before these columns existed
get the dataset name alone as their identity (settings not recorded) and no late flag.

A second table, `evaluations`, holds the scores of runs' heads on other caches (`probe eval`, `EvaluationRecord`);
an older ledger gains it, empty, when opened.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from common.runtime import output_root
from ledger.records import SCENARIO, STAGES, EvaluationRecord, RunRecord, unrecorded_identity

_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage TEXT NOT NULL,
    scenario TEXT NOT NULL,
    backbone TEXT NOT NULL,
    dataset TEXT NOT NULL,
    head TEXT NOT NULL,
    config TEXT NOT NULL,
    config_key TEXT NOT NULL,
    cache_fingerprint TEXT,
    seed INTEGER NOT NULL,
    primary_metric TEXT NOT NULL,
    val_score REAL,
    test_metrics TEXT NOT NULL,
    test_primary REAL,
    backbone_random INTEGER NOT NULL,
    head_random INTEGER NOT NULL,
    train_seconds REAL,
    total_seconds REAL,
    code_version TEXT,
    run_dir TEXT,
    created TEXT NOT NULL,
    dataset_id TEXT NOT NULL DEFAULT '',
    dataset_label TEXT NOT NULL DEFAULT '',
    dataset_inputs TEXT NOT NULL DEFAULT '{}',
    late_best INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT '',
    cost_seconds REAL,
    throughput REAL,
    extract_seconds REAL,
    extract_device TEXT NOT NULL DEFAULT '',
    collapsed INTEGER NOT NULL DEFAULT 0,
    chance INTEGER NOT NULL DEFAULT 0
"""
# What a result cost (docs/architecture.md, "Cost"): `device` the run's (`common.runtime.device_label`), `cost_seconds` its
# own wall seconds times its devices (a sweep's heads trained together share their pass: each gets its share),
# `throughput` train rows (probe) or images (finetune) per second, and for probe rows the cache's extraction:
# `extract_seconds` (the whole extraction, every run of the cache records it; a report counts it once per cache) and
# `extract_device`. Rows written before these columns have NULL costs: "not recorded", never 0.
_COST_COLUMNS = {"device": "TEXT NOT NULL DEFAULT ''", "cost_seconds": "REAL", "throughput": "REAL", "extract_seconds": "REAL",
                 "extract_device": "TEXT NOT NULL DEFAULT ''"}
# Runs that learned nothing (`scoring.health`): `collapsed` one predicted class for > 95 % of the test rows, `chance` a test
# score within noise of chance. Rows written before these columns are not flagged.
_HEALTH_COLUMNS = {"collapsed": "INTEGER NOT NULL DEFAULT 0", "chance": "INTEGER NOT NULL DEFAULT 0"}
# Columns added after the first release, with what old rows get: ALTER TABLE adds them to an older ledger.
_ADDED = {"dataset_id": "TEXT NOT NULL DEFAULT ''", "dataset_label": "TEXT NOT NULL DEFAULT ''",
          "dataset_inputs": "TEXT NOT NULL DEFAULT '{}'", "late_best": "INTEGER NOT NULL DEFAULT 0",
          **_COST_COLUMNS, **_HEALTH_COLUMNS}
_JSON_FIELDS = ("config", "test_metrics", "dataset_inputs")
# `probe eval`: a run's head scored on another cache of the same features (a corrupted test view, another dataset), one
# row per (run, cache fingerprint): evaluating again replaces it. `dropped_rows`: test rows of classes the label map leaves
# without a counterpart (`--allow-unmapped`).
_EVALUATION_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL,
    run_key TEXT NOT NULL,
    trained_dataset_id TEXT NOT NULL,
    dataset TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    dataset_label TEXT NOT NULL,
    corruption_kind TEXT NOT NULL DEFAULT '',
    corruption_severity NUMERIC,
    cache TEXT NOT NULL,
    cache_fingerprint TEXT NOT NULL,
    primary_metric TEXT NOT NULL,
    score REAL,
    metrics TEXT NOT NULL,
    scored_rows INTEGER NOT NULL,
    dropped_rows INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    UNIQUE (run_id, cache_fingerprint)
"""
_FLAGS = ("backbone_random", "head_random", "late_best", "collapsed", "chance")


def default_ledger_path() -> Path:
    return output_root() / "runs" / "results.sqlite"


class Ledger:
    """Append and query run rows; each call opens its own connection, so processes can share the file."""

    LOCK_WAIT = 60.0  # seconds a write waits for another process's lock before its row goes to the pending folder

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                if not _up_to_date(db):  # a read-only ledger of today's layout is read, never written
                    db.execute("BEGIN IMMEDIATE")  # one process at a time creates or migrates the table
                    db.execute(f"CREATE TABLE IF NOT EXISTS runs ({_COLUMNS})")
                    db.execute("CREATE INDEX IF NOT EXISTS runs_config_key ON runs (config_key)")
                    db.execute(f"CREATE TABLE IF NOT EXISTS evaluations ({_EVALUATION_COLUMNS})")
                    _migrate(db)
        except sqlite3.DatabaseError as err:
            raise MedfmError(f"cannot read the results ledger {self.path} ({err}); check it with `sqlite3 {self.path} 'PRAGMA "
                             "integrity_check'`, and move it aside only once no medfm process is writing to it (or point --ledger "
                             "at another file)") from None
        if self.pending.is_dir():  # rows a run kept aside while another process held the lock
            try:
                self.merge_pending()
            except sqlite3.OperationalError:
                pass  # still locked: they wait for the next command

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=self.LOCK_WAIT)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commits, or rolls back on error
                yield db
        finally:
            db.close()

    def add(self, record: RunRecord) -> int | None:
        """Append one row; returns its id. If another process holds the ledger's write lock past the wait (a backup,
        an open `sqlite3` shell), the row is kept in the pending folder beside the ledger instead, never lost, and the
        next process that opens the ledger merges it (`merge_pending`); then None is returned."""
        if record.stage not in STAGES:
            raise ValueError(f"stage {record.stage} not in {STAGES}")
        if not SCENARIO.fullmatch(record.scenario):
            raise ValueError(f"scenario {record.scenario} is not frozen|unfrozen|last<K> - linear|deit, frozen-knn or zero-shot")
        if not record.dataset_id:
            record.with_identity(unrecorded_identity(record.dataset))
        row = _row(record)
        try:
            with self._connect() as db:
                record.id = self._insert(db, row)
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            self.pending.mkdir(parents=True, exist_ok=True)
            path = self.pending / f"{record.created.replace(':', '')}-{record.config_key[:16]}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(path)
            print(f"note: the results ledger {self.path} is locked by another process; this run's row is kept in {path} and "
                  "the next command that opens the ledger merges it", file=sys.stderr)
            return None
        return record.id

    @property
    def pending(self) -> Path:
        """Rows that could not be written while another process held the ledger's lock, one JSON file each."""
        return self.path.with_name(self.path.name + ".pending")

    def merge_pending(self) -> int:
        """Write the pending rows into the ledger (each once: a row already there by its key and time is not added twice);
        the count merged. Safe while another writer is active: it waits for the lock like any write."""
        if not self.pending.is_dir():
            return 0
        merged = 0
        for path in sorted(self.pending.glob("*.json")):
            row = json.loads(path.read_text())
            with self._connect() as db:
                there = db.execute("SELECT 1 FROM runs WHERE config_key = ? AND created = ?", (row["config_key"], row["created"])).fetchone()
                if there is None:
                    self._insert(db, row)
                    merged += 1
            path.unlink()
        return merged

    @staticmethod
    def _insert(db: sqlite3.Connection, row: dict[str, Any]) -> int:
        names, marks = ", ".join(row), ", ".join(f":{n}" for n in row)
        return int(db.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", row).lastrowid)

    def find(self, key: str) -> RunRecord | None:
        """The latest run with this config_key, or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE config_key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return _record(row) if row is not None else None

    def rows(self, **equal: Any) -> list[RunRecord]:
        """Runs in insertion order, filtered by column equality; a list or tuple value means any of them."""
        where, params = _where(equal, RunRecord)
        with self._connect() as db:
            return [_record(r) for r in db.execute(f"SELECT * FROM runs{where} ORDER BY id", params)]

    def add_evaluation(self, record: EvaluationRecord) -> int:
        """Record a `probe eval` result; one of the same run on the same cache (fingerprint) is replaced. Returns its id."""
        row = asdict(record)
        row.pop("id")
        row["metrics"] = json.dumps(row["metrics"], sort_keys=True, default=str)
        with self._connect() as db:
            cursor = db.execute(f"INSERT OR REPLACE INTO evaluations ({', '.join(row)}) VALUES ({', '.join(':' + n for n in row)})", row)
            record.id = int(cursor.lastrowid)
        return record.id

    def evaluations(self, **equal: Any) -> list[EvaluationRecord]:
        """`probe eval` results in the order they were recorded, filtered as `rows`."""
        where, params = _where(equal, EvaluationRecord)
        with self._connect() as db:
            found = db.execute(f"SELECT * FROM evaluations{where} ORDER BY id", params).fetchall()
        return [EvaluationRecord(**{**dict(r), "metrics": json.loads(r["metrics"])}) for r in found]


def _row(record: RunRecord) -> dict[str, Any]:
    """A record as the table stores it: JSON fields as text, flags as 0/1, no id."""
    row = asdict(record)
    row.pop("id")
    for name in _JSON_FIELDS:
        row[name] = json.dumps(row[name], sort_keys=True, default=str)
    for flag in _FLAGS:
        row[flag] = int(bool(row[flag]))
    return row


def _where(equal: dict[str, Any], kind: type) -> tuple[str, list[Any]]:
    """` WHERE a IN (?) AND ...` over the fields of dataclass `kind`; a list, tuple or set value means any of them."""
    clauses, params = [], []
    for column, value in equal.items():
        if column not in kind.__dataclass_fields__:
            raise ValueError(f"no ledger column {column}")
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        clauses.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "0")
        params.extend(values)
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), params


def _record(row: sqlite3.Row) -> RunRecord:
    data = {k: v for k, v in dict(row).items() if k in RunRecord.__dataclass_fields__}
    for name in _JSON_FIELDS:
        data[name] = json.loads(data[name])
    for flag in _FLAGS:
        data[flag] = bool(data[flag])
    return RunRecord(**data)


def _up_to_date(db: sqlite3.Connection) -> bool:
    """Whether the ledger's tables exist with today's columns (nothing to create or migrate)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    evaluations = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'evaluations'").fetchone()
    return bool(columns) and set(_ADDED) <= columns and "random_weights" not in columns and evaluations is not None


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older ledger to today's columns: the two random flags, then the dataset identity and late flag."""
    _split_random_flag(db)
    columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
    for name, declaration in _ADDED.items():
        if name not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {name} {declaration}")
    unnamed = db.execute("SELECT id, dataset FROM runs WHERE dataset_id = ''").fetchall()
    for rid, dataset in unnamed:
        identity = unrecorded_identity(dataset)
        db.execute("UPDATE runs SET dataset_id = ?, dataset_label = ? WHERE id = ?", (identity.id, identity.label, rid))


def _split_random_flag(db: sqlite3.Connection) -> None:
    """Rewrite a ledger of medfm 0.1 (one `random_weights` flag) with the two flags of today.

    Its probe rows flagged the backbone alone; its finetune rows flagged "backbone or DeiT head", so their
    backbone flag is read from the weights identity in their config and the rest is the head's.
    """
    columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
    if "random_weights" not in columns:
        return
    rows = [dict(zip(columns, values, strict=True)) for values in db.execute("SELECT * FROM runs ORDER BY id")]
    db.execute("DROP TABLE runs")
    db.execute(f"CREATE TABLE runs ({_COLUMNS})")
    db.execute("CREATE INDEX IF NOT EXISTS runs_config_key ON runs (config_key)")
    for row in rows:
        random = bool(row.pop("random_weights"))
        backbone = random
        if row["stage"] == "finetune":
            backbone = json.loads(row["config"]).get("weights", {}).get("kind") == "random"
        row.update(backbone_random=int(backbone), head_random=int(random and not backbone))
        db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join(':' + n for n in row)})", row)
