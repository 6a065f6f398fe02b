"""`probe ledger check` and `probe ledger recover`: what is wrong with a results ledger, and a copy of what still reads.

A damaged ledger is never changed here, so both are safe while another process writes to it. `check` runs SQLite's
own `PRAGMA integrity_check` on a read-only connection. `recover` merges the pending rows (`<ledger>.pending/`) into an
intact ledger; of a damaged one it writes a copy beside it, `<stem>.recovered-<time><suffix>`, built under a temporary
name and renamed whole, holding every row SQLite can still read (a damaged index leaves its table whole), the rows
still found on the file's pages where a table's own b-tree is damaged (`scan_pages`, as SQLite's `.recover` reads
them), and the pending rows. Ids are kept, so `probe eval` and `probe compare` name the same runs in the copy.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from ledger.records import STAGES
from ledger.store import Ledger, LedgerError, error_kind, insert, insert_new, one_line_errors, pending_rows, table_columns

TABLES = ("runs", "evaluations")
Rows = dict[int, dict[str, Any]]  # id -> {column: value}


def check(path: Path) -> list[str]:
    """SQLite's integrity check of the ledger `path`, read-only: the problems it lists, none when the ledger is intact."""
    if not path.is_file():
        raise MedfmError(f"no results ledger at {path}; give --ledger the ledger file (default $MEDFM_OUTPUT/runs/results.sqlite)")
    try:
        with closing(_read_only(path)) as db:
            found = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    except sqlite3.Error as err:
        if error_kind(err) != "damaged":
            raise LedgerError(path, err) from None
        return [str(err)]
    return [] if found == ["ok"] else found


@dataclass
class Recovery:
    """What `recover` did: merged pending rows into an intact ledger, or wrote a copy of a damaged one."""

    path: Path
    problems: list[str]
    merged: int = 0  # pending rows merged (intact) or copied (damaged)
    copy: Path | None = None
    runs: list[int] = field(default_factory=list)  # the ids of the runs copied
    evaluations: int = 0
    highest: int | None = None  # the highest run id the damaged ledger had given out, where it still says

    def line(self) -> str:
        """What was done, in one line."""
        if self.copy is None:
            merged = f"merged {self.merged} pending row(s) into it" if self.merged else "no row was pending"
            return f"the results ledger {self.path} is intact (integrity_check: ok); {merged}"
        read = f"{len(self.runs)} run(s) (ids {_spans(self.runs)})" if self.runs else "no run"
        lost = ""
        if self.highest is not None and self.highest > len(self.runs):
            lost = f"; {self.highest - len(self.runs)} of the {self.highest} run ids it gave out could not be read (or were never kept)"
        pending = f" and {self.merged} pending row(s)" if self.merged else ""
        return (f"the results ledger {self.path} is damaged ({self.problems[0]}); wrote {self.copy} with {read}, "
                f"{self.evaluations} evaluation(s){pending}{lost}; the damaged file is left as it was: use the copy with --ledger "
                f"{self.copy}, or, once no medfm process writes to the ledger, put it in its place (mv {self.copy} {self.path})")


def recover(path: Path) -> Recovery:
    """Merge the pending rows into an intact ledger; of a damaged one, write a recovered copy beside it (see the module)."""
    problems = check(path)
    if not problems:
        ledger = Ledger(path)
        return Recovery(path, [], merged=ledger.merged + ledger.merge_pending())
    columns = {table: _columns(path, table) for table in TABLES}
    tables = {table: _read_table(path, table) for table in TABLES}
    if any(rows is None for rows in tables.values()):
        found = scan_pages(path.read_bytes(), columns)
        tables = {table: rows if rows is not None else found[table] for table, rows in tables.items()}
    tables["evaluations"] = _latest_evaluations(tables["evaluations"])
    recovery = Recovery(path, problems, highest=_highest(path))
    _write_copy(path, tables, recovery)
    return recovery


def _write_copy(path: Path, tables: dict[str, Rows], recovery: Recovery) -> None:
    """A new ledger beside `path` holding `tables` and the pending rows, built under a temporary name, then renamed."""
    copy = _copy_name(path)
    partial = copy.with_name(copy.name + ".partial")
    partial.unlink(missing_ok=True)
    Ledger(partial)  # today's tables
    known = {table: set(table_columns(table)) for table in TABLES}
    with one_line_errors(partial), closing(sqlite3.connect(partial)) as db:
        for table, rows in tables.items():
            for rid, row in sorted(rows.items()):
                try:
                    insert(db, table, {k: v for k, v in {**row, "id": rid}.items() if k in known[table]})
                except sqlite3.IntegrityError:
                    continue  # a row missing what today's table needs: counted as unread
                if table == "runs":
                    recovery.runs.append(rid)
                else:
                    recovery.evaluations += 1
        for _, row in pending_rows(path):  # they stay beside the damaged ledger too, until the copy takes its place
            recovery.merged += insert_new(db, row)
        db.commit()
    os.replace(partial, copy)
    recovery.copy = copy


def _copy_name(path: Path) -> Path:
    """`<stem>.recovered-<time><suffix>` beside `path`, a name no file has yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 100):
        copy = path.with_name(f"{path.stem}.recovered-{stamp}{'' if n == 1 else f'-{n}'}{path.suffix}")
        if not copy.exists():
            return copy
    raise MedfmError(f"too many recovered copies of {path} beside it this second; rerun in a second")


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that can change nothing in the file, waiting for another writer as the ledger does."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=Ledger.LOCK_WAIT)


def _columns(path: Path, table: str) -> list[str]:
    """The table's columns as the damaged ledger declares them (an older ledger has fewer), else today's."""
    try:
        with closing(_read_only(path)) as db:
            names = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
    except sqlite3.DatabaseError:
        names = []
    return names or table_columns(table)


def _read_table(path: Path, table: str) -> Rows | None:
    """Every row of `table` as SQLite reads it, by id; None when reading it meets damage ({} when there is no such table)."""
    try:
        with closing(_read_only(path)) as db:
            db.row_factory = sqlite3.Row
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone() is None:
                return {}
            return {int(row["id"]): dict(row) for row in db.execute(f"SELECT * FROM {table}")}
    except sqlite3.DatabaseError:
        return None


def _highest(path: Path) -> int | None:
    """The highest run id the ledger gave out (SQLite's AUTOINCREMENT counter), or None where that cannot be read."""
    try:
        with closing(_read_only(path)) as db:
            found = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return int(found[0]) if found else None


def _latest_evaluations(rows: Rows) -> Rows:
    """One evaluation per (run, cache), the latest: a scan of the pages can find one that `probe eval` later replaced."""
    latest: dict[tuple[Any, Any], int] = {}
    for rid, row in sorted(rows.items()):
        latest[(row.get("run_id"), row.get("cache_fingerprint"))] = rid
    return {rid: rows[rid] for rid in sorted(latest.values())}


def _spans(ids: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# --- reading rows off the pages, for a table whose b-tree is damaged (SQLite's file format: sqlite.org/fileformat.html)

TABLE_LEAF = 0x0D
OTHER_TREE_PAGES = (0x02, 0x05, 0x0A)  # index interior, table interior, index leaf: no rows on them
MAX_VALUES = 64  # more values than any ledger table has columns: not a row of one
CELL_ERRORS = (IndexError, ValueError, struct.error, UnicodeDecodeError)  # bytes that do not parse as a whole cell


@dataclass
class _Pages:
    """The file's bytes as SQLite pages, and the overflow pages that the cells read so far continue on."""

    data: bytes
    size: int
    usable: int  # bytes of a page SQLite uses (the rest is reserved)
    overflow: set[int] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.data) // self.size

    def page(self, number: int) -> bytes:
        return self.data[(number - 1) * self.size : number * self.size]


def scan_pages(data: bytes, columns: dict[str, list[str]]) -> dict[str, Rows]:
    """The rows of the ledger's tables found on the file's pages, by id: the cells of every table leaf page, then every
    record that parses whole on a page that is neither a b-tree page nor an overflow page (one whose header is damaged).
    Pages on the freelist (deleted data) are skipped; a record counts only with the shape of a row (`_table_of`)."""
    pages = _Pages(data, *_page_size(data))
    skip = _freelist(pages) | {1}  # page 1 holds the schema
    found: dict[str, Rows] = {table: {} for table in columns}
    leaves = [n for n in range(2, pages.count + 1) if n not in skip and pages.page(n)[0] == TABLE_LEAF]
    for number in leaves:
        _keep(found, _cells(pages, number), columns)
    known = skip | set(leaves) | pages.overflow
    for number in range(2, pages.count + 1):
        if number not in known and pages.page(number)[0] not in OTHER_TREE_PAGES:
            _keep(found, _carve(pages, number), columns)
    return found


def _keep(found: dict[str, Rows], cells: Iterator[tuple[int, list[Any]]], columns: dict[str, list[str]]) -> None:
    """Add the cells that are rows of a ledger table to `found`, the first of each id."""
    for rowid, values in cells:
        table = _table_of(values, columns)
        if table is not None:
            found[table].setdefault(rowid, {name: value for name, value in zip(columns[table], values, strict=False) if name != "id"})


def _page_size(data: bytes) -> tuple[int, int]:
    """(page size, usable bytes per page) from the file's header; SQLite's default where the header is damaged."""
    size = struct.unpack(">H", data[16:18])[0] if len(data) >= 100 else 4096
    size = 65536 if size == 1 else size
    if size < 512 or size & (size - 1):
        return 4096, 4096
    return size, size - data[20]


def _freelist(pages: _Pages) -> set[int]:
    """The pages on the freelist (trunk and leaf pages), as far as the list reads."""
    free: set[int] = set()
    trunk = struct.unpack(">I", pages.data[32:36])[0]
    while 1 < trunk <= pages.count and trunk not in free:
        free.add(trunk)
        page = pages.page(trunk)
        trunk, count = struct.unpack(">II", page[:8])
        leaves = page[8 : 8 + 4 * min(count, pages.size // 4 - 2)]
        free.update(struct.unpack(f">{len(leaves) // 4}I", leaves))
    return free


def _cells(pages: _Pages, number: int) -> Iterator[tuple[int, list[Any]]]:
    """(rowid, values) of each cell of the table leaf page `number` that parses."""
    page = pages.page(number)
    count = struct.unpack(">H", page[3:5])[0]
    for i in range(min(count, pages.size // 2)):
        pointer = struct.unpack(">H", page[8 + 2 * i : 10 + 2 * i])[0]
        try:
            yield _cell(pages, page, pointer)[:2]
        except CELL_ERRORS:
            continue


def _carve(pages: _Pages, number: int) -> Iterator[tuple[int, list[Any]]]:
    """(rowid, values) of every cell that parses whole at some offset of page `number`, whose header is damaged."""
    page, at = pages.page(number), 0
    while at < pages.usable - 4:
        try:
            rowid, values, end = _cell(pages, page, at)
        except CELL_ERRORS:
            at += 1
            continue
        yield rowid, values
        at = end


def _cell(pages: _Pages, page: bytes, at: int) -> tuple[int, list[Any], int]:
    """(rowid, values, end offset) of the table leaf cell at `at` of `page`; ValueError where it does not parse whole."""
    size, at = _varint(page, at)
    rowid, at = _varint(page, at)
    if not 0 < size < 1 << 30 or not 0 < rowid < 1 << 62:
        raise ValueError("not a cell")
    most = pages.usable - 35  # the payload a page keeps; the rest goes to overflow pages
    if size <= most:
        payload = page[at : at + size]
        if len(payload) < size:
            raise ValueError("cut off")
        return rowid, _record(payload), at + size
    least = (pages.usable - 12) * 32 // 255 - 23
    local = least + (size - least) % (pages.usable - 4)
    local = local if local <= most else least
    payload = bytearray(page[at : at + local])
    following, chain = struct.unpack(">I", page[at + local : at + local + 4])[0], []
    while len(payload) < size:
        if not 1 < following <= pages.count or following in chain:
            raise ValueError("broken overflow chain")
        chain.append(following)
        continued = pages.page(following)
        following = struct.unpack(">I", continued[:4])[0]
        payload += continued[4 : pages.usable][: size - len(payload)]
    values = _record(bytes(payload))
    pages.overflow.update(chain)
    return rowid, values, at + local + 4


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian variable-length integer at `at`: (value, offset after it)."""
    value = 0
    for i in range(8):
        byte = buf[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | buf[at + 8], at + 9


INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}  # serial type -> bytes of a big-endian signed integer
CONSTANTS = {0: None, 8: 0, 9: 1}  # serial types that store no bytes


def _record(payload: bytes) -> list[Any]:
    """The values of a record (its header of serial types, then the values), which must fill `payload` exactly."""
    header, at = _varint(payload, 0)
    if not 0 < header <= len(payload):
        raise ValueError("bad header")
    kinds = []
    while at < header:
        kind, at = _varint(payload, at)
        kinds.append(kind)
        if len(kinds) > MAX_VALUES:
            raise ValueError("too many values")
    values, at = [], header
    for kind in kinds:
        value, at = _value(payload, at, kind)
        values.append(value)
    if at != len(payload):
        raise ValueError("record does not fill its payload")
    return values


def _value(payload: bytes, at: int, kind: int) -> tuple[Any, int]:
    """One value of serial type `kind` at `at`: (value, offset after it)."""
    if kind in CONSTANTS:
        return CONSTANTS[kind], at
    if kind in INT_SIZES:
        end = at + INT_SIZES[kind]
        return int.from_bytes(_take(payload, at, end), "big", signed=True), end
    if kind == 7:
        return struct.unpack(">d", _take(payload, at, at + 8))[0], at + 8
    if kind < 12:
        raise ValueError("reserved serial type")
    end = at + (kind - 12) // 2
    raw = _take(payload, at, end)
    return (raw.decode("utf-8") if kind % 2 else raw), end


def _take(payload: bytes, start: int, end: int) -> bytes:
    if end > len(payload):
        raise ValueError("value runs past the record")
    return payload[start:end]


def _table_of(values: list[Any], columns: dict[str, list[str]]) -> str | None:
    """Which ledger table a record is a row of, by its shape (the id stored as NULL, then the columns' kinds), or None."""
    for table, names in columns.items():
        if not values or values[0] is not None or len(values) > len(names):
            continue
        row = dict(zip(names, values, strict=False))  # an older row has fewer values than today's columns
        if not isinstance(row.get("created"), str):
            continue
        if table == "runs" and row.get("stage") in STAGES and isinstance(row.get("config_key"), str):
            return table
        if table == "evaluations" and isinstance(row.get("run_id"), int) and isinstance(row.get("cache_fingerprint"), str):
            return table
    return None
