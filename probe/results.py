"""The results ledger: one SQLite row per training run, shared by probe and finetune.

SQLite, because several processes (sweep workers, a finetune beside a probe) append at once and a
report must read a consistent table. `config_key` hashes what decides a result (stage, config, cache
fingerprint, seed), so a run already in the ledger can be skipped instead of retrained.

Columns mean one thing in both stages: `stage` is probe (heads on cached features) or finetune (live
images); `backbone_random` says the backbone's weights were random, `head_random` that a head meant to
start from pretrained weights (the DeiT head) started random. A ledger written before these two columns
existed is rewritten with them when opened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cache.fingerprint import canonical_json
from common.errors import MedfmError
from common.runtime import output_root

STAGES = ("probe", "finetune")
# The study's four scenarios, frozen|unfrozen x linear|deit, plus partial unfreezing of the last K blocks.
SCENARIO = re.compile(r"(frozen|unfrozen|last[1-9][0-9]*)-(linear|deit)")

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
    created TEXT NOT NULL
"""
_JSON_FIELDS = ("config", "test_metrics")
_FLAGS = ("backbone_random", "head_random")


def default_ledger_path() -> Path:
    return output_root() / "runs" / "results.sqlite"


def config_key(config: dict[str, Any], fingerprint: str | None, seed: int) -> str:
    """Identity of a result: the training config (no paths or devices in it), the features and the seed."""
    text = canonical_json({"config": config, "cache_fingerprint": fingerprint, "seed": seed})
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version("medfm")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class RunRecord:
    """One finished run, as the ledger stores it (`id` and `created` are filled on `add`)."""

    stage: str
    scenario: str
    backbone: str
    dataset: str
    head: str
    config: dict[str, Any]
    config_key: str
    cache_fingerprint: str | None
    seed: int
    primary_metric: str
    val_score: float | None
    test_metrics: dict[str, Any]
    test_primary: float | None
    backbone_random: bool
    head_random: bool = False
    train_seconds: float | None = None
    total_seconds: float | None = None
    code_version: str = field(default_factory=code_version)
    run_dir: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    id: int | None = None


class Ledger:
    """Append and query run rows; each call opens its own connection, so processes can share the file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute(f"CREATE TABLE IF NOT EXISTS runs ({_COLUMNS})")
                db.execute("CREATE INDEX IF NOT EXISTS runs_config_key ON runs (config_key)")
                _migrate(db)
        except sqlite3.DatabaseError as err:
            raise MedfmError(f"cannot read the results ledger {self.path} ({err}); move it aside and rerun, "
                             "or point --ledger at another file") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commits, or rolls back on error
                yield db
        finally:
            db.close()

    def add(self, record: RunRecord) -> int:
        """Append one row; returns its id."""
        if record.stage not in STAGES:
            raise ValueError(f"stage {record.stage} not in {STAGES}")
        if not SCENARIO.fullmatch(record.scenario):
            raise ValueError(f"scenario {record.scenario} is not frozen|unfrozen|last<K> - linear|deit")
        row = asdict(record)
        row.pop("id")
        for name in _JSON_FIELDS:
            row[name] = json.dumps(row[name], sort_keys=True, default=str)
        for flag in _FLAGS:
            row[flag] = int(bool(row[flag]))
        names = ", ".join(row)
        marks = ", ".join(f":{n}" for n in row)
        with self._connect() as db:
            cursor = db.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", row)
            record.id = int(cursor.lastrowid)
        return record.id

    def find(self, key: str) -> RunRecord | None:
        """The latest run with this config_key, or None."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE config_key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return _record(row) if row is not None else None

    def rows(self, **equal: Any) -> list[RunRecord]:
        """Runs in insertion order, filtered by column equality; a list or tuple value means any of them."""
        clauses, params = [], []
        for column, value in equal.items():
            if column not in RunRecord.__dataclass_fields__:
                raise ValueError(f"no ledger column {column}")
            values = list(value) if isinstance(value, (list, tuple, set)) else [value]
            clauses.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "0")
            params.extend(values)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._connect() as db:
            return [_record(r) for r in db.execute(f"SELECT * FROM runs{where} ORDER BY id", params)]


def _record(row: sqlite3.Row) -> RunRecord:
    data = {k: v for k, v in dict(row).items() if k in RunRecord.__dataclass_fields__}
    for name in _JSON_FIELDS:
        data[name] = json.loads(data[name])
    for flag in _FLAGS:
        data[flag] = bool(data[flag])
    return RunRecord(**data)


def _migrate(db: sqlite3.Connection) -> None:
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
