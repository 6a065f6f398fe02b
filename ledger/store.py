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

Every query runs inside one connection wrapper (`Ledger._connect`), so any SQLite error (locked past the wait, a
damaged file, a read-only one) is one `LedgerError` line naming the file and a way out that loses nothing while
another process writes to it; `ledger/repair.py` checks a ledger and recovers what a damaged one holds.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
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
_SCHEMAS = {"runs": _COLUMNS, "evaluations": _EVALUATION_COLUMNS}


def default_ledger_path() -> Path:
    return output_root() / "runs" / "results.sqlite"


class LedgerError(MedfmError):
    """A SQLite error of the ledger as one line naming the file and a way out that is safe while another process writes it.

    `kind` says which: locked (another writer held it past the wait), damaged, readonly, unopenable, other."""

    def __init__(self, path: Path, err: sqlite3.Error) -> None:
        self.kind = error_kind(err)
        super().__init__(_advice(path, self.kind, err))


def error_kind(err: sqlite3.Error) -> str:
    """The kind of a sqlite3 error, from its SQLite result code (Python 3.11 names it)."""
    name = getattr(err, "sqlite_errorname", "") or ""
    for kind, codes in (("locked", ("SQLITE_BUSY", "SQLITE_LOCKED")), ("damaged", ("SQLITE_CORRUPT", "SQLITE_NOTADB")),
                        ("readonly", ("SQLITE_READONLY",)), ("unopenable", ("SQLITE_CANTOPEN",))):
        if name.startswith(codes):
            return kind
    return "other"


def _advice(path: Path, kind: str, err: sqlite3.Error) -> str:
    """What happened to the ledger `path`, and what to do that loses nothing even while another process writes to it."""
    said = f"the results ledger {path}"
    if kind == "locked":
        return (f"{said} stayed locked by another process for {Ledger.LOCK_WAIT:.0f} s ({err}); wait for it to finish (a backup or an "
                f"open sqlite3 shell holds it) and rerun; a trained run's row is never lost: it waits in {pending_folder(path)} and "
                "the next command merges it")
    if kind == "damaged":
        return (f"{said} is damaged ({err}); `probe ledger check --ledger {path}` lists the damage and `probe ledger recover "
                f"--ledger {path}` writes what can still be read into a copy beside it, leaving this file as it is")
    if kind == "readonly":
        return (f"cannot write {said} ({err}): the file or its folder is read-only; make both writable, or record elsewhere "
                "(--ledger FILE, or MEDFM_OUTPUT)")
    if kind == "unopenable":
        return f"cannot open {said} ({err}): its folder is missing or not readable; give --ledger an existing ledger file"
    return f"{said} failed ({err}); `probe ledger check --ledger {path}` checks it"


@contextmanager
def one_line_errors(path: Path) -> Iterator[None]:
    """Every sqlite3 error of the ledger `path` inside the block as one `LedgerError` line."""
    try:
        yield
    except sqlite3.Error as err:
        raise LedgerError(path, err) from None


# why a row could not be written, and what becomes of it: `Ledger.add` keeps it in the pending folder and says so
_KEPT = {"locked": ("locked by another process", "the next command that opens the ledger merges it"),
         "damaged": ("damaged", "`probe ledger recover --ledger {}` puts it into the recovered copy"),
         "readonly": ("read-only", "the next command that opens the ledger once it is writable merges it")}


def pending_folder(path: Path) -> Path:
    """Rows that could not be written to the ledger `path` (locked, damaged), one JSON file each, beside it."""
    return path.with_name(path.name + ".pending")


class Ledger:
    """Append and query run rows; each call opens its own connection, so processes can share the file."""

    LOCK_WAIT = 60.0  # seconds a write waits for another process's lock before its row goes to the pending folder

    def __init__(self, path: str | Path | None = None, *, create: bool = True) -> None:
        """`create=False` for commands that only read results: a mistyped --ledger is one line, never a new empty ledger."""
        self.path = Path(path) if path is not None else default_ledger_path()
        if not create and not self.path.is_file():
            raise MedfmError(f"no results ledger at {self.path}; `probe run` and `finetune run` record their runs in "
                             "$MEDFM_OUTPUT/runs/results.sqlite: give --ledger that file (or train some runs first)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MedfmError(f"cannot create the folder of the results ledger {self.path} ({err.strerror}); give --ledger (or "
                             "MEDFM_OUTPUT) a writable place") from None
        with self._connect() as db:
            if not _up_to_date(db):  # a read-only ledger of today's layout is read, never written
                db.execute("BEGIN IMMEDIATE")  # one process at a time creates or migrates the table
                db.execute(f"CREATE TABLE IF NOT EXISTS runs ({_COLUMNS})")
                db.execute("CREATE INDEX IF NOT EXISTS runs_config_key ON runs (config_key)")
                db.execute(f"CREATE TABLE IF NOT EXISTS evaluations ({_EVALUATION_COLUMNS})")
                _migrate(db)
        self.merged = 0  # pending rows merged on opening
        if self.pending.is_dir():  # rows a run kept aside while another process held the lock
            try:
                self.merged = self.merge_pending()
            except LedgerError:
                pass  # still locked (or damaged): they wait for the next command, or `probe ledger recover`

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction; any sqlite3 error in it is one `LedgerError` line."""
        with one_line_errors(self.path):
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
        next process that opens the ledger merges it (`merge_pending`); then None is returned. So is a row the ledger
        cannot take because it is damaged (`probe ledger recover` puts it into the recovered copy) or read-only."""
        if record.stage not in STAGES:
            raise ValueError(f"stage {record.stage} not in {STAGES}")
        if not SCENARIO.fullmatch(record.scenario):
            raise ValueError(f"scenario {record.scenario} is not frozen|unfrozen|last<K> - linear|deit, frozen-knn or zero-shot")
        if not record.dataset_id:
            record.with_identity(unrecorded_identity(record.dataset))
        row = _row(record)
        try:
            with self._connect() as db:
                record.id = insert(db, "runs", row)
        except LedgerError as err:
            if err.kind not in _KEPT:
                raise
            path = self._keep_pending(row, err)
            state, then = _KEPT[err.kind]
            print(f"note: the results ledger {self.path} is {state}; this run's row is kept in {path} and {then.format(self.path)}",
                  file=sys.stderr)
            return None
        return record.id

    def _keep_pending(self, row: dict[str, Any], err: LedgerError) -> Path:
        """Write `row` to the pending folder (atomically); if even that fails, the ledger's own error stands."""
        path = self.pending / f"{row['created'].replace(':', '')}-{row['config_key'][:16]}.json"
        try:
            self.pending.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(row))
            tmp.replace(path)
        except OSError:
            raise err from None
        return path

    @property
    def pending(self) -> Path:
        """Rows that could not be written while another process held the ledger's lock, one JSON file each."""
        return pending_folder(self.path)

    def merge_pending(self) -> int:
        """Write the pending rows into the ledger (each once: a row already there by its key and time is not added twice);
        the count merged. Safe while another writer is active: it waits for the lock like any write."""
        merged = 0
        for path, row in pending_rows(self.path):
            with self._connect() as db:
                merged += insert_new(db, row)
            path.unlink()
        return merged

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


def pending_rows(path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The rows waiting beside the ledger `path`, oldest first; a file that is not one is one line naming it."""
    rows = []
    for file in sorted(pending_folder(path).glob("*.json")):
        try:
            row = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise MedfmError(f"cannot read the pending ledger row {file} ({err}); move it out of {file.parent} and rerun (the "
                             "run's folder still holds its results; `probe run --force` records it again)") from None
        if not isinstance(row, dict) or not {"config_key", "created"} <= set(row):
            raise MedfmError(f"{file} is no pending ledger row (no config_key and created); move it out of {file.parent} and rerun")
        rows.append((file, row))
    return rows


def insert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> int:
    """Insert one row given as {column: value}; its id."""
    names, marks = ", ".join(row), ", ".join(f":{n}" for n in row)
    return int(db.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", row).lastrowid)


def insert_new(db: sqlite3.Connection, row: dict[str, Any]) -> int:
    """Insert a run's row unless one of the same key and time is there (a pending row merged twice); 1 if inserted."""
    there = db.execute("SELECT 1 FROM runs WHERE config_key = ? AND created = ?", (row["config_key"], row["created"])).fetchone()
    if there is None:
        insert(db, "runs", row)
    return int(there is None)


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


def table_columns(table: str) -> list[str]:
    """Today's columns of the ledger table `table` (runs, evaluations), in their order."""
    with closing(sqlite3.connect(":memory:")) as db:
        db.execute(f"CREATE TABLE {table} ({_SCHEMAS[table]})")
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
