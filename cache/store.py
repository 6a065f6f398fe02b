"""The HDF5 feature cache: schema, writer (write by index, resume, finalize) and reader.

Layout of one file::

    /                    attrs: schema_version, fingerprint, complete, meta (a `cache.schema.CacheMeta` as JSON:
                                backbone, dataset, task, layers, settings, transform, skipped)
    /<split>/ids         [N] utf-8 strings, written at creation
    /<split>/labels      [N] int64 or [N, C] float32 (multilabel), written at creation
    /<split>/valid       [N] bool, False for images skipped as unreadable (--skip-bad)
    /<split>/<feature>   [N, ...] e.g. pooled [N, D] float32, tokens [N, T, D] float16,
                         pooled@4 / tokens@4 for extra layers; chunked along N
    /<split>/crc32/<feature>  [N] uint32, the CRC-32 of each stored row, computed as the row is written
    /<split>/scale/<feature>  [N, ...] float32, with an int8 feature (`extract run --token-dtype int8`): one scale per
                         vector along its last axis (per token), value = int8 * scale (`dequantize`); its rows have
                         their CRC-32 in /<split>/crc32/scale/<feature> like any array
    /train+view<v>/...   augmented train view v (`extract --views K`): the same ids and labels as train, its
                         own features, rows mark and checksums, so each view resumes on its own and reading
                         one view is a contiguous slice
    /<split>             attrs: rows (rows written so far), n (rows planned), crc32_ids, crc32_labels, crc32_valid
    /                    attrs: meta_sha256 (the meta as written), fingerprint = sha256 of meta.settings
    /text/classes        [C, D] float32, optional: a CLIP text tower's class embeddings (`extract zeroshot`), added to a
                         complete file under its lock; attrs crc32_classes, sha256 (of the array), templates, words,
                         model (JSON). Not a split: the meta and fingerprint stay as extracted; rewritten by a rerun
    /sources/path, size, mtime_ns [, sha256]   optional (image caches): the files the rows were decoded from, as they
                         were when the file was created (`SourceFiles`); attrs crc32_<array>, hashed. Not a split and
                         not fingerprinted: a reader compares it with the files as they are now

Crash safety: a file is written as `<name>.h5.partial` with every chunk allocated at creation (and its
disk space reserved, so a full disk is found before the first row, not in the middle), so a batch write
touches raw data only; `rows` is raised after the batch is flushed. `finalize` marks `complete` and
renames the file to `<name>.h5`. A killed run leaves only a `.partial` file, which the next run with the
same fingerprint resumes from `rows`. One writer at a time: the writer holds `<name>.h5.lock`
(`common.locks`), so a second identical extraction stops before it touches the first one's file.

Integrity: readers refuse a file whose meta differs from its checksum or whose settings do not hash to its
fingerprint; every read of feature rows (`CacheReader.read_rows` and all that goes through it: `features`,
`iter_slices`, slicing `dataset(...)`) recomputes the CRC-32 of each row it returns and stops at the first that
differs (`DamagedCache`, naming the file, split, array and row); ids, labels and validity are checked against their
checksums when first read. `verify` recomputes every checksum and names the split, array and rows that differ.
CRC-32 finds every error of up to 32 consecutive bits (a flipped byte among them) and is computed in
the writer thread at memory speed; it guards against accidents, not against someone who rewrites the
checksums too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import operator
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cache.fingerprint import fingerprint as settings_fingerprint
from cache.schema import VIEW_PREFIX, CacheMeta, Task
from common.errors import MedfmError
from common.locks import FileLock, acquire, holder

SCHEMA_VERSION = 2  # 2: per-row checksums, meta checksum, fingerprint = sha256 of the settings
SPLITS = ("train", "val", "test")
CHUNK_BYTES = 4 << 20  # a read of one chunk moves ~4 MiB: large enough for full disk speed
# The writer opens its file without HDF5's chunk cache (8 MiB by default since HDF5 2.0). A batch that covers a chunk
# in part then goes straight to its place in the file; with the cache, HDF5 read the whole chunk in first and every
# flush wrote it whole again, so a CNN's tokens at batch 16 were read once and written twice (0.2-0.27 ms a row against
# 0.06 without the cache; 0.09 against 0.066 at batch 256). Whole raw rows are what a chunk holds, so nothing is lost.
WRITER_CHUNK_CACHE = 0
PARTIAL_SUFFIX = ".partial"


class DamagedCache(MedfmError):
    """Bytes of a cache that differ from their checksum: the file was damaged after it was written."""


@dataclass(frozen=True)
class FeatureSpec:
    """One stored feature array: per-row shape and dtype."""

    shape: tuple[int, ...]
    dtype: str  # "float32" | "float16" | "int8" (with its scale array, `scale_key`) | "uint8" (an image cache's pixels)


SCALE_GROUP = "scale"  # <split>/scale/<feature>: the scales of an int8 feature


def scale_key(feature: str) -> str:
    """Where the scales of int8 array `feature` are stored, read and checksummed like any array of the split."""
    return f"{SCALE_GROUP}/{feature}"


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 rows [N, ..., D] times their scales [N, ...] (one per vector along the last axis), as float32."""
    return values.astype(np.float32) * scales[..., None]


@dataclass(frozen=True)
class SplitPlan:
    """What a split will hold: its ids and labels (known up front) and the feature arrays to fill."""

    ids: Sequence[str]
    labels: np.ndarray
    features: dict[str, FeatureSpec]
    metadata: dict[str, Sequence[str]] = field(default_factory=dict)  # per-sample columns (sex, age, ...), text per row


def chunk_rows(row_shape: Sequence[int], dtype: str, n: int) -> int:
    """Rows per chunk so that a chunk is about CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(n, CHUNK_BYTES // max(row_bytes, 1))))


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def row_crcs(array: np.ndarray) -> np.ndarray:
    """The CRC-32 of each row's bytes, [N] uint32."""
    rows = np.ascontiguousarray(array).reshape(len(array), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


def array_crc(array: np.ndarray) -> int:
    """The CRC-32 of a whole array (ids are hashed as their newline-joined text)."""
    if array.dtype.kind in "OUS":
        return zlib.crc32("\n".join(str(v) for v in array).encode())
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8))


def meta_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def planned_bytes(plan: dict[str, SplitPlan]) -> int:
    """The bytes a cache of this plan takes on disk, about: feature rows, their checksums, ids and labels."""
    total = 0
    for sp in plan.values():
        n = len(sp.ids)
        row = sum(int(np.prod(f.shape, dtype=np.int64)) * np.dtype(f.dtype).itemsize + 4 for f in sp.features.values())
        total += n * row + np.asarray(sp.labels).nbytes + sum(len(i) + 16 for i in sp.ids) + n
    return total


SOURCES_GROUP = "sources"  # /sources: the files the rows were made from (`SourceFiles`), never a split
HASH_THREADS = 4  # files hashed at once by `SourceFiles.record(..., hashed=True)`: reading overlaps hashing


@dataclass(frozen=True)
class SourceFiles:
    """The files a cache's rows were made from (an image cache's images) as they were when the cache was created: the
    absolute path, size and modification time (ns) of each, (-1, -1) for one missing then, and with `hashed` the
    sha256 of its bytes.

    `changed()` compares them with the files as they are now: one `os.stat` a file. With hashes, a file whose size
    and time are the same passes unread, and one whose time alone differs (a copy, a touch, a restore) is hashed and
    passes when its bytes are the same. A file rewritten with its size and time kept (`touch -r`, `cp -p` of another
    file of the same size) is not seen by the stat check.
    """

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[int, ...]  # st_mtime_ns
    digests: tuple[str, ...] | None = None  # sha256 hex of each file's bytes ("" for a missing one), when recorded

    @classmethod
    def record(cls, paths: Sequence[str | os.PathLike], *, hashed: bool = False) -> SourceFiles:
        """The files now (each path once, in first-seen order): stat, then with `hashed` their sha256."""
        absolute = tuple(dict.fromkeys(os.path.abspath(p) for p in paths))
        stats = [_stat(p) for p in absolute]
        digests = None
        if hashed:
            with ThreadPoolExecutor(HASH_THREADS) as pool:
                digests = tuple(pool.map(_digest, absolute))
        return cls(absolute, tuple(s for s, _ in stats), tuple(m for _, m in stats), digests)

    @property
    def hashed(self) -> bool:
        return self.digests is not None

    def nbytes(self) -> int:
        """About what the record takes in a file."""
        return sum(len(p) + 16 for p in self.paths) + 16 * len(self.paths) + (64 * len(self.paths) if self.hashed else 0)

    def changed(self) -> list[tuple[str, str]]:
        """(path, what changed) of every recorded file that is not as it was, in record order."""
        out = []
        for i, (path, size, mtime) in enumerate(zip(self.paths, self.sizes, self.mtimes, strict=True)):
            now_size, now_mtime = _stat(path)
            if now_size == size and now_mtime == mtime:
                continue
            if now_size < 0:
                out.append((path, "missing"))
            elif size < 0:
                out.append((path, "present now, missing when the cache was built"))
            elif now_size != size:
                out.append((path, f"size {size} -> {now_size} bytes"))
            elif self.digests is None:
                out.append((path, f"modified {_when(mtime)} -> {_when(now_mtime)}"))
            elif _digest(path) != self.digests[i]:
                out.append((path, "content differs from its recorded sha256"))
        return out


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError:
        return ""
    return digest.hexdigest()


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 1_000_000_000:09d}"[:4]


def _write_sources(file: h5py.File, sources: SourceFiles) -> None:
    group = file.create_group(SOURCES_GROUP)
    arrays = {"path": np.array(sources.paths, dtype=object), "size": np.array(sources.sizes, dtype=np.int64).reshape(-1),
              "mtime_ns": np.array(sources.mtimes, dtype=np.int64).reshape(-1)}
    if sources.digests is not None:
        arrays["sha256"] = np.array(sources.digests, dtype=object)
    for key, values in arrays.items():
        if values.dtype == object:
            group.create_dataset(key, shape=values.shape, data=values if len(values) else None, dtype=h5py.string_dtype())
        else:
            group.create_dataset(key, data=values)
        group.attrs[f"crc32_{key}"] = array_crc(values)
    group.attrs["hashed"] = sources.hashed


def _read_sources(file: h5py.File, where: str) -> SourceFiles | None:
    """The file's source record checked against its checksums, or None when it has none (written before it existed)."""
    if SOURCES_GROUP not in file:
        return None
    group, arrays = file[SOURCES_GROUP], {}
    for key in group:
        ds = group[key]
        values = np.array(ds.asstr()[:], dtype=object) if h5py.check_string_dtype(ds.dtype) else ds[:]
        if int(group.attrs.get(f"crc32_{key}", -1)) != array_crc(values):
            raise DamagedCache(f"{where}: sources/{key} differs from its checksum")
        arrays[key] = values.tolist()
    digests = tuple(arrays["sha256"]) if "sha256" in arrays else None
    return SourceFiles(tuple(arrays["path"]), tuple(arrays["size"]), tuple(arrays["mtime_ns"]), digests)


def _disk_full(err: OSError) -> bool:
    return err.errno == errno.ENOSPC or "No space left" in str(err) or "errno = 28" in str(err)


def _create_early(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]) -> None:
    """Create a chunked dataset whose chunks are all allocated now, so later writes change no metadata.

    Allocated, not filled: writing zeros over the whole planned file first would double the disk writes
    and stall the start (about 2 s per 600 MB here); rows past `rows` are never read anyway.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl)


class CacheWriter:
    """Writes one cache file, holding its lock; resumes a `.partial` file with the same fingerprint.

    The fingerprint is the hash of `meta.settings`, so a file's name, fingerprint and meta always agree.
    """

    def __init__(self, path: Path, file: h5py.File, lock: FileLock, resumed: bool = False) -> None:
        self.path = path
        self._file = file
        self._lock = lock
        self.resumed = resumed  # a partial file was resumed (else the file was created afresh)

    @classmethod
    def open(cls, path: Path, meta: CacheMeta, plan: dict[str, SplitPlan], *, sources: SourceFiles | None = None,
             replace: bool = False) -> CacheWriter:
        """Lock `path`, then open its partial file for writing: resume it if it matches, else create it.

        `sources`: the files the rows are made from, recorded in a new file; a partial file is resumed only when it
        recorded the same (else its rows may come from other bytes). `replace`: remove a complete or partial file of
        this name first, under the lock (`extract images --rebuild`)."""
        path = Path(path)
        lock = acquire(path, f"the cache {path}")
        try:
            partial = partial_path(path)
            if replace:
                path.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
            if path.exists():
                raise MedfmError(f"{path} already exists and is complete; reuse it or remove it with `cache rm {path}`")
            fingerprint = settings_fingerprint(meta.settings)
            if partial.exists():
                file = _open_resumable(partial, fingerprint, sources)
                if file is not None:
                    return cls(path, file, lock, resumed=True)
                partial.unlink()  # other settings or sources, or unreadable: we hold the lock, nobody writes it
            return cls(path, _create(partial, fingerprint, meta, plan, sources), lock)
        except BaseException:
            lock.release()
            raise

    def rows(self, split: str) -> int:
        """Rows of `split` already written (the resume point)."""
        return int(self._file[split].attrs["rows"])

    def planned(self, split: str) -> int:
        return int(self._file[split].attrs["n"])

    def write(self, split: str, start: int, features: dict[str, np.ndarray], valid: np.ndarray | None = None) -> None:
        """Write rows [start, start + batch) of every feature and their checksums, then advance the `rows` mark."""
        group = self._file[split]
        stop = start
        try:
            for name, array in features.items():
                stop = start + len(array)
                group[name][start:stop] = array
                group["crc32"][name][start:stop] = row_crcs(array)
            if valid is not None and not valid.all():
                group["valid"][start:stop] = valid
            self._file.flush()
            group.attrs["rows"] = max(stop, int(group.attrs["rows"]))
            self._file.flush()
        except OSError as err:
            if _disk_full(err):
                raise MedfmError(f"the disk of {self.path.parent} is full; {partial_path(self.path).name} keeps the rows written "
                                 "so far and resumes when you rerun after freeing space") from None
            raise

    def meta(self) -> CacheMeta:
        return CacheMeta.from_json(self._file.attrs["meta"], str(self.path))

    def add_skipped(self, ids: Sequence[str]) -> None:
        """Record images left out as unreadable (--skip-bad) in the meta."""
        _set_meta(self._file, self.meta().with_skipped(ids).to_json())

    def add_cost(self, seconds: float, device: str) -> None:
        """Add `seconds` of extraction on `device` to the meta's cost (outside the fingerprinted settings)."""
        _set_meta(self._file, self.meta().with_cost(seconds, device).to_json())

    @contextmanager
    def costed(self, device: str) -> Iterator[None]:
        """Add the block's wall seconds on `device` to the cost, also when it is interrupted (a resumed run adds to them)."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the interruption is what the caller must hear about
                self.add_cost(time.perf_counter() - started, device)
            raise
        self.add_cost(time.perf_counter() - started, device)

    def finalize(self) -> Path:
        """Mark the file complete and move it to its final name; refuses if any split is short."""
        for split in groups(self._file):
            group = self._file[split]
            if int(group.attrs["rows"]) != int(group.attrs["n"]):
                raise MedfmError(f"cannot finalize {self.path}: split {split} has {group.attrs['rows']} of {group.attrs['n']} rows")
            group.attrs["crc32_valid"] = array_crc(group["valid"][:])
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        os.replace(partial_path(self.path), self.path)
        self._lock.release()
        return self.path

    def close(self) -> None:
        """Close without finalizing (the partial file stays, resumable) and release the lock."""
        if self._file.id.valid:
            self._file.close()
        self._lock.release()


def _set_meta(file: h5py.File, text: str) -> None:
    file.attrs["meta"] = text
    file.attrs["meta_sha256"] = meta_digest(text)


def _smaller(plan: dict[str, SplitPlan]) -> str:
    """How to plan a smaller file: fewer arrays for a feature cache, a smaller resize for an image cache (`extract images`)."""
    names = {name for split in plan.values() for name in split.features}
    if "pixels" in names:
        return "store smaller images (a smaller --resize)"
    return "store fewer arrays (--no-tokens)" if any(name.startswith("tokens") for name in names) else "store fewer blocks (--layers)"


def _create(partial: Path, fingerprint: str, meta: CacheMeta, plan: dict[str, SplitPlan],
            sources: SourceFiles | None = None) -> h5py.File:
    """A new partial file with every array allocated and its disk space reserved, or one clear line when it cannot fit."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    need, free = planned_bytes(plan) + (sources.nbytes() if sources else 0), shutil.disk_usage(partial.parent).free
    if need > free:
        raise MedfmError(f"{partial.name[: -len(PARTIAL_SUFFIX)]} needs {need / 2**20:.1f} MiB but {partial.parent} has "
                         f"{free / 2**20:.1f} MiB free; free space, {_smaller(plan)} or pass --out on a larger disk")
    file = h5py.File(partial, "w", rdcc_nbytes=WRITER_CHUNK_CACHE)
    try:
        file.attrs["schema_version"] = SCHEMA_VERSION
        file.attrs["fingerprint"] = fingerprint
        file.attrs["complete"] = False
        _set_meta(file, meta.to_json())
        if sources is not None:
            _write_sources(file, sources)
        for split, sp in plan.items():
            n = len(sp.ids)
            group = file.create_group(split)
            group.attrs["n"] = n
            group.attrs["rows"] = 0
            ids = np.array(list(sp.ids), dtype=h5py.string_dtype())
            group.create_dataset("ids", data=ids)
            group.create_dataset("labels", data=np.asarray(sp.labels))
            group.create_dataset("valid", data=np.ones(n, dtype=bool))
            group.attrs["crc32_ids"] = array_crc(np.array(list(sp.ids), dtype=object))
            group.attrs["crc32_labels"] = array_crc(np.asarray(sp.labels))
            group.attrs["crc32_valid"] = 0  # set at finalize; created now so that finalizing needs no new file space
            if sp.metadata:
                _write_metadata(group, sp.metadata)
            crcs = group.create_group("crc32")
            for name, spec in sp.features.items():
                rows = chunk_rows(spec.shape, spec.dtype, max(n, 1))
                _create_early(group, name, (n, *spec.shape), spec.dtype, (rows, *spec.shape))
                crcs.create_dataset(name, shape=(n,), dtype=np.uint32)
        file.flush()
        with open(partial, "rb+") as fh:  # reserve the blocks now: a full disk fails here, before any row
            os.posix_fallocate(fh.fileno(), 0, os.path.getsize(partial))
    except OSError as err:
        file.close()
        partial.unlink(missing_ok=True)
        if _disk_full(err):
            raise MedfmError(f"not enough disk space in {partial.parent} for {partial.name[: -len(PARTIAL_SUFFIX)]} "
                             f"({need / 2**20:.1f} MiB); free space or pass --out on a larger disk") from None
        raise
    return file


TEXT_GROUP = "text"  # /text/classes: class text embeddings for zero-shot (`extract zeroshot`), never a split


@dataclass(frozen=True)
class TextClasses:
    """The class embeddings of a cache's `text` group: [C, D] float32, L2-normalised rows, and how they were made."""

    classes: np.ndarray
    templates: tuple[str, ...]
    words: tuple[str, ...]
    model: dict[str, Any]
    sha256: str


def write_text_classes(path: Path, classes: np.ndarray, templates: Sequence[str], words: Sequence[str], model: dict[str, Any]) -> None:
    """Store (or replace) the `text` group of a complete cache, holding its lock: a cache being written is refused."""
    path = Path(path)
    classes = np.ascontiguousarray(classes, dtype=np.float32)
    with acquire(path, f"the cache {path}"):
        CacheReader(path, check_lock=False).close()  # complete, unedited, this schema: else one clear line
        with h5py.File(path, "r+") as file:
            if TEXT_GROUP in file:
                del file[TEXT_GROUP]
            group = file.create_group(TEXT_GROUP)
            group.create_dataset("classes", data=classes)
            group.attrs["crc32_classes"] = array_crc(classes)
            group.attrs["sha256"] = hashlib.sha256(classes.tobytes()).hexdigest()
            group.attrs["templates"] = json.dumps(list(templates))
            group.attrs["words"] = json.dumps(list(words))
            group.attrs["model"] = json.dumps(model, sort_keys=True)


def _read_text(file: h5py.File, where: str) -> TextClasses | None:
    """The `text` group checked against its checksum, or None when the cache has none."""
    if TEXT_GROUP not in file:
        return None
    group = file[TEXT_GROUP]
    classes = group["classes"][:]
    if int(group.attrs.get("crc32_classes", -1)) != array_crc(classes):
        raise MedfmError(f"{where}: text/classes differs from its checksum; rerun `extract zeroshot` on it")
    return TextClasses(classes, tuple(json.loads(group.attrs["templates"])), tuple(json.loads(group.attrs["words"])),
                       json.loads(group.attrs["model"]), str(group.attrs["sha256"]))


META_GROUP = "meta"  # <split>/meta/<column>: per-sample metadata as utf-8 text, a checksum each (crc32_meta_<column>)


def meta_key(column: str) -> str:
    """An HDF5-safe name for a metadata column ("Frontal/Lateral" -> "Frontal%2FLateral")."""
    return column.replace("%", "%25").replace("/", "%2F")


def _write_metadata(group: h5py.Group, metadata: dict[str, Sequence[str]]) -> None:
    meta = group.create_group(META_GROUP)
    for column, values in metadata.items():
        text = np.array([str(v) for v in values], dtype=object)
        if len(text) != int(group.attrs["n"]):
            raise ValueError(f"metadata column {column}: {len(text)} values for {group.attrs['n']} rows")
        meta.create_dataset(meta_key(column), data=text.astype(h5py.string_dtype()), dtype=h5py.string_dtype())
        group.attrs[f"crc32_meta_{meta_key(column)}"] = array_crc(text)


def _read_metadata(group: h5py.Group, where: str) -> dict[str, np.ndarray]:
    """Every metadata column of a split (all rows), checked against its checksum."""
    out = {}
    for key in group.get(META_GROUP, {}):
        values = np.array(group[META_GROUP][key].asstr()[:], dtype=object)
        if int(group.attrs.get(f"crc32_meta_{key}", -1)) != array_crc(values):
            raise MedfmError(f"{where}: metadata column {key} differs from its checksum; re-create the cache with `extract run`")
        out[key.replace("%2F", "/").replace("%25", "%")] = values
    return out


def _open_resumable(partial: Path, fingerprint: str, sources: SourceFiles | None = None) -> h5py.File | None:
    """Open a partial file for resuming, or None when it is unreadable, belongs to other settings or (given `sources`)
    recorded other source files than these."""
    try:
        file = h5py.File(partial, "r+", rdcc_nbytes=WRITER_CHUNK_CACHE)
    except OSError:
        return None
    if file.attrs.get("fingerprint") != fingerprint or file.attrs.get("schema_version") != SCHEMA_VERSION:
        file.close()
        return None
    if sources is not None:
        try:
            recorded = _read_sources(file, str(partial))
        except DamagedCache:
            recorded = None
        if recorded != sources:
            file.close()
            return None
    return file


@dataclass(frozen=True)
class _RawChunks:
    """The file layout of an array stored as raw, whole-row chunks: what `CacheReader.read_rows` needs to copy them."""

    offsets: np.ndarray  # byte offset in the file of chunk i (rows i*rows ...)
    rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    row_bytes: int
    length: int  # rows of the array
    in_order: bool  # the chunks lie end to end in row order (as the writer allocates them): the array is one span


class CacheReader:
    """Reads a complete cache: pooled features into RAM, tokens into RAM or by contiguous slices."""

    def __init__(self, path: str | Path, *, check_lock: bool = True) -> None:
        self.path = Path(path)
        final = self.path.with_name(self.path.name.removesuffix(PARTIAL_SUFFIX))
        if check_lock and (writer := holder(final)) is not None:
            raise MedfmError(f"cache {final} is being written by {writer}; wait for it to finish")
        if not self.path.exists():
            if partial_path(self.path).exists():
                raise MedfmError(f"cache {self.path} is incomplete (only {partial_path(self.path).name} exists); rerun the same `extract run` to finish it")
            raise MedfmError(f"cache file {self.path} does not exist; list caches with `cache ls`")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise MedfmError(f"cannot open cache {self.path}: {' '.join(str(err).split())}; remove it with `cache rm` and extract again") from None
        try:
            self._check()
        except MedfmError:
            self._file.close()
            raise
        self.fingerprint: str = str(self._file.attrs["fingerprint"])
        self._meta: CacheMeta | None = None
        self._map: np.memmap | None = None  # the whole file, mapped on the first raw-chunk read
        self._raw: dict[tuple[str, str], _RawChunks | None] = {}
        self._crc: dict[tuple[str, str], np.ndarray] = {}  # each array's stored row checksums, read once
        self._checked_rows: dict[tuple[str, str], np.ndarray] = {}  # rows of each array found sound by this reader
        self._sound: set[tuple[str, str]] = set()  # (split, ids | labels | valid) found equal to their checksum

    def _check(self) -> None:
        """Refuse what is not a complete, unedited cache of this schema, with the way out."""
        attrs, path = self._file.attrs, self.path
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise MedfmError(f"cache {path} has schema {attrs.get('schema_version')}, this medfm reads {SCHEMA_VERSION}; "
                             f"remove it with `cache rm {path}` and extract again")
        if not bool(attrs.get("complete", False)):
            if path.name.endswith(PARTIAL_SUFFIX):
                raise MedfmError(f"cache {path} is incomplete; rerun the same `extract run` to finish it")
            raise MedfmError(f"cache {path} carries a final name but is not marked complete; remove it with `cache rm {path}` "
                             "and rerun the same `extract run`")
        if (problem := _meta_problem(attrs)) is not None:
            raise MedfmError(f"cache {path}: {READER_WORDS[problem]}; remove it with `cache rm {path}` and extract again")
        for split in groups(self._file):
            group = self._file[split]
            if "crc32" not in group or any(name not in group["crc32"] for name in _arrays(group)):
                raise MedfmError(f"cache {path} has no checksums for {split}; remove it with `cache rm {path}` and extract again")

    @property
    def meta(self) -> CacheMeta:
        """The typed description of the cache (a file without one is a clear error here, not a KeyError later)."""
        if self._meta is None:
            self._meta = CacheMeta.from_json(self._file.attrs["meta"], f"cache {self.path}")
        return self._meta

    @property
    def task(self) -> Task:
        return self.meta.task

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self._file]

    @property
    def groups(self) -> list[str]:
        """The splits, then the augmented train views (`cache.schema.view_group`)."""
        return groups(self._file)

    def text_classes(self) -> TextClasses | None:
        """The class text embeddings `extract zeroshot` stored (checked against their checksum), or None."""
        return _read_text(self._file, f"cache {self.path}")

    def sources(self) -> SourceFiles | None:
        """The source files recorded when the cache was created (checked against their checksums), or None when the
        cache recorded none (a feature cache, or an image cache built before they were recorded)."""
        try:
            return _read_sources(self._file, f"cache {self.path}")
        except DamagedCache as err:
            raise self._damage(str(err).split(": ", 1)[1]) from None

    def feature_names(self, split: str = "train") -> list[str]:
        return [k for k in self._file[split] if k not in _NOT_FEATURES]

    def stored_arrays(self, split: str) -> list[str]:
        """Every row array of `split`: its features, then the scales of its int8 features (`scale_key`)."""
        return _arrays(self._file[split])

    def scales(self, split: str, name: str) -> str | None:
        """The array holding the scales of feature `name` of `split` when it is stored as int8, else None."""
        return scale_key(name) if scale_key(name) in self._file[split] else None

    def valid(self, split: str) -> np.ndarray:
        return self._checked(split, "valid", self._file[split]["valid"][:])

    def ids(self, split: str) -> np.ndarray:
        """Ids of the valid rows."""
        return self.row_ids(split)[self.valid(split)]

    def row_ids(self, split: str) -> np.ndarray:
        """Ids of every row, valid or not (row i of each array)."""
        return self._checked(split, "ids", self._file[split]["ids"].asstr()[:])

    def metadata(self, split: str) -> dict[str, np.ndarray]:
        """Per-sample metadata columns of the valid rows (text; "" where the release had none); {} when none was stored."""
        valid = self.valid(split)
        return {column: values[valid] for column, values in _read_metadata(self._file[split], f"cache {self.path}, {split}").items()}

    def labels(self, split: str) -> np.ndarray:
        """Labels of the valid rows."""
        return self._checked(split, "labels", self._file[split]["labels"][:])[self.valid(split)]

    def features(self, split: str, name: str = "pooled") -> np.ndarray:
        """The whole feature array of the valid rows, in RAM; an int8 one dequantized (float32)."""
        data = self.read_rows(split, name, 0, len(self._dataset(split, name)))
        if (scale := self.scales(split, name)) is not None:
            data = dequantize(data, self.read_rows(split, scale, 0, len(data)))
        valid = self.valid(split)
        return data if valid.all() else data[valid]

    def dataset(self, split: str, name: str) -> CheckedRows | h5py.Dataset:
        """An array of a split (all rows, valid or not) for streamed reads: a feature array as `CheckedRows` (h5py's
        shape, dtype and chunks; reads by index checked row by row), any other (ids, labels, valid) as h5py's dataset."""
        ds = self._dataset(split, name)
        return CheckedRows(self, split, name, ds) if name in self._file[split].get("crc32", {}) else ds

    def _dataset(self, split: str, name: str) -> h5py.Dataset:
        if name not in self._file[split]:
            raise MedfmError(f"cache {self.path} has no '{name}' features in {split}; it holds {', '.join(self.feature_names(split))}")
        return self._file[split][name]

    def iter_slices(self, split: str, name: str, order: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, array) chunk by chunk, in chunk `order` (default: file order)."""
        ds = self._dataset(split, name)
        step = ds.chunks[0] if ds.chunks else len(ds)
        starts = list(range(0, len(ds), step))
        for i in order if order is not None else range(len(starts)):
            yield starts[i], self.read_rows(split, name, starts[i], min(starts[i] + step, len(ds)))

    def read_rows(self, split: str, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of a feature array (valid or not), into `out` when given, each row checked against its
        stored CRC-32 (`DamagedCache`, naming the row, at the first that differs).

        The writer stores chunks raw (no filters, every chunk allocated), so their bytes are copied
        straight from a memory map of the file: on a page-cached file that runs at a NumPy memmap's
        speed, about twice HDF5's own read path (bench/reads.py). Other layouts are read by h5py.
        The checksums are computed over the rows just copied, a chunk's part at a time, while they are in the CPU's cache.
        """
        raw = self._raw_chunks(split, name)
        if raw is None:
            ds = self._dataset(split, name)
            out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype) if out is None else out
            ds.read_direct(out, np.s_[start:stop])
            self._check_rows(split, name, np.arange(start, stop), out)
            return out
        out = np.empty((stop - start, *raw.row_shape), dtype=raw.dtype) if out is None else out
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        checked = (done := self._checked_rows.get((split, name))) is not None and bool(done[start:stop].all())
        step = max(1, CHECK_BYTES // max(raw.row_bytes, 1))  # rows copied, then checked while in the CPU's cache, at a time
        for chunk in range(start // raw.rows, -(-stop // raw.rows)):
            lo, hi = max(start, chunk * raw.rows), min(stop, (chunk + 1) * raw.rows)
            at = int(raw.offsets[chunk]) + (lo - chunk * raw.rows) * raw.row_bytes
            block = np.frombuffer(self._map, raw.dtype, (hi - lo) * raw.row_bytes // raw.dtype.itemsize, at)
            block = block.reshape(hi - lo, *raw.row_shape)
            if checked:
                out[lo - start : hi - start] = block
                continue
            for a in range(lo, hi, step):
                b = min(a + step, hi)
                part = out[a - start : b - start]
                part[...] = block[a - lo : b - lo]
                self._check_rows(split, name, np.arange(a, b), part)
        return out

    def take_rows(self, split: str, name: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `rows` (sorted, unique) of a feature array, into `out` when given, each checked against its CRC-32 the first
        time it is read.

        A window of a uniform shuffle touches most chunks but few consecutive rows, so on the raw layout (`read_rows`) the
        rows are gathered off the mapped file in one call, as a NumPy memmap's fancy indexing does (one call per chunk
        where the chunks do not lie end to end), rather than a call per run of consecutive rows. Other layouts are read
        by `read_rows` one run of consecutive rows at a time."""
        raw = self._raw_chunks(split, name)
        if raw is None:
            ds = self._dataset(split, name)
            length, row_shape, dtype = len(ds), ds.shape[1:], ds.dtype
        else:
            length, row_shape, dtype = raw.length, raw.row_shape, raw.dtype
        out = np.empty((len(rows), *row_shape), dtype=dtype) if out is None else out
        if not len(rows):
            return out
        if rows[0] < 0 or rows[-1] >= length:
            raise IndexError(f"rows {rows[0]}..{rows[-1]} are not all within {split}/{name}'s {length} rows")
        if raw is None:
            cuts = np.flatnonzero(np.diff(rows) != 1) + 1
            for s, e in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist(), strict=True):
                self.read_rows(split, name, int(rows[s]), int(rows[e - 1]) + 1, out[s:e])
            return out
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if raw.in_order:  # one gather over the whole array
            span = len(raw.offsets) * raw.rows
            whole = np.frombuffer(self._map, raw.dtype, span * raw.row_bytes // raw.dtype.itemsize, int(raw.offsets[0]))
            np.take(whole.reshape(span, *raw.row_shape), rows, axis=0, out=out, mode="clip")
        else:
            chunks = rows // raw.rows
            cuts = np.flatnonzero(np.diff(chunks)) + 1
            for s, e in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(rows)].tolist(), strict=True):
                chunk = int(chunks[s])  # every chunk is stored whole (`_raw_chunks`), the last one too
                whole = np.frombuffer(self._map, raw.dtype, raw.rows * raw.row_bytes // raw.dtype.itemsize, int(raw.offsets[chunk]))
                np.take(whole.reshape(raw.rows, *raw.row_shape), rows[s:e] - chunk * raw.rows, axis=0, out=out[s:e], mode="clip")
        self._check_rows(split, name, rows, out)
        return out

    def _checksums(self, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored CRC-32 of each written row of an array, and which rows this reader has checked already."""
        key = (split, name)
        if key not in self._crc:
            group = self._file[split]
            self._crc[key] = group["crc32"][name][: int(group.attrs["rows"])]
            self._checked_rows[key] = np.zeros(len(self._crc[key]), dtype=bool)
        return self._crc[key], self._checked_rows[key]

    def _check_rows(self, split: str, name: str, rows: np.ndarray, block: np.ndarray) -> None:
        """Raise `DamagedCache` at the first of `rows` (row indices of an array, in `block`'s order) whose CRC-32 differs
        from the stored one. A row is checked the first time this reader reads it (a streamed probe reads every row each
        epoch: the later reads copy at memory speed). Rows past the split's `rows` mark have no checksum yet and are not
        checked."""
        crc, done = self._checksums(split, name)
        todo = np.flatnonzero(rows < len(crc))
        todo = todo[~done[rows[todo]]]
        if not len(todo):
            return
        flat = np.ascontiguousarray(block).reshape(len(block), -1).view(np.uint8)
        for i in todo.tolist():
            if zlib.crc32(flat[i]) != int(crc[rows[i]]):
                raise self._damage(f"{split}/{name} row {int(rows[i])} differs from its checksum")
        done[rows[todo]] = True

    def _checked(self, split: str, key: str, data: np.ndarray) -> np.ndarray:
        """`data` (a split's ids, labels or valid), checked against its checksum the first time it is read."""
        if (split, key) not in self._sound:
            stored = self._file[split].attrs.get(f"crc32_{key}")
            if stored is not None and int(stored) != array_crc(data):
                raise self._damage(f"{split}/{key} differs from its checksum")
            self._sound.add((split, key))
        return data

    def _damage(self, what: str) -> DamagedCache:
        """The one line for bytes that changed after they were written: where, and what to do."""
        again = "rerun `extract images` (it rebuilds it)" if self.meta.settings.get("kind") == "pixels" else "extract it again"
        return DamagedCache(f"cache {self.path}: {what}, so the file was damaged after it was written; `cache verify {self.path}` "
                            f"lists all damage; remove it with `cache rm {self.path}` and {again}")

    def _raw_chunks(self, split: str, name: str) -> _RawChunks | None:
        """Where each row-chunk of an array lies in the file, when every chunk is stored raw and whole; else None."""
        key = (split, name)
        if key not in self._raw:
            ds = self._dataset(split, name)
            self._raw[key] = None
            whole_rows = ds.chunks is not None and ds.chunks[1:] == ds.shape[1:] and ds.dtype.isnative and len(ds) > 0
            if whole_rows and ds.id.get_create_plist().get_nfilters() == 0:
                rows, row_shape, dtype = ds.chunks[0], tuple(ds.shape[1:]), np.dtype(ds.dtype)
                row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
                infos = [ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())]
                if len(infos) == -(-len(ds) // rows) and all(i.filter_mask == 0 and i.size == rows * row_bytes for i in infos):
                    offsets = np.empty(len(infos), dtype=np.int64)
                    for info in infos:
                        offsets[info.chunk_offset[0] // rows] = info.byte_offset
                    in_order = bool(np.all(np.diff(offsets) == rows * row_bytes))
                    self._raw[key] = _RawChunks(offsets, rows, row_shape, dtype, row_bytes, len(ds), in_order)
        return self._raw[key]

    def nbytes(self, split: str, name: str) -> int:
        ds = self._dataset(split, name)
        return int(ds.size * ds.dtype.itemsize)

    def close(self) -> None:
        self._map = None
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_NOT_FEATURES = ("ids", "labels", "valid", "crc32", META_GROUP, SCALE_GROUP)


def _arrays(group: h5py.Group) -> list[str]:
    """A split's row arrays, each with a checksum per row: its features, then its int8 features' scales."""
    return [k for k in group if k not in _NOT_FEATURES] + [scale_key(k) for k in group.get(SCALE_GROUP, {})]
CHECK_BYTES = 1 << 20  # `read_rows` copies then checks this many bytes of rows at a time: they are still in the CPU cache


class CheckedRows:
    """A feature array of a cache as h5py shows it (shape, dtype, chunks, len) whose reads by index (`[:]`, `[a:b]`,
    `[i]`, `[rows]`, `np.asarray`) go through `CacheReader.read_rows`: each row read is checked against its CRC-32.
    Any other attribute is the h5py dataset's own (`read_direct` through it reads unchecked)."""

    def __init__(self, reader: CacheReader, split: str, name: str, dataset: h5py.Dataset) -> None:
        self._reader, self._split, self._name, self._dataset = reader, split, name, dataset

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dataset, attr)

    def __len__(self) -> int:
        return len(self._dataset)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[()]
        return data if dtype is None else data.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not key or key[0] is Ellipsis:
            data = self._rows(0, len(self))
            return data[key] if key else data
        rows, rest = key[0], key[1:]
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(len(self))
            data = self._rows(start, max(start, stop))
        elif isinstance(rows, slice | list | np.ndarray):
            picks = np.arange(len(self))[rows]
            data = self._pick(picks)
        else:
            row = operator.index(rows)
            row = row + len(self) if row < 0 else row
            if not 0 <= row < len(self):
                raise IndexError(f"row {rows} is out of range for {len(self)} rows")
            return self._rows(row, row + 1)[(0, *rest)]
        return data[(slice(None), *rest)] if rest else data

    def _rows(self, start: int, stop: int) -> np.ndarray:
        return self._reader.read_rows(self._split, self._name, start, stop)

    def _pick(self, rows: np.ndarray) -> np.ndarray:
        """Rows in any order: one read of their span when they are dense in it, else one read a row."""
        if not len(rows):
            return self._rows(0, 0)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * len(rows):
            return self._rows(lo, hi)[rows - lo]
        return np.concatenate([self._rows(int(r), int(r) + 1) for r in rows])


def groups(file: h5py.File) -> list[str]:
    """The split groups of a file in order: train, val, test, then the augmented train views by index."""
    views = sorted((k for k in file if k.startswith(VIEW_PREFIX)), key=lambda k: int(k[len(VIEW_PREFIX):]))
    return [s for s in SPLITS if s in file] + views


CACHE_FILE = re.compile(r".+\.h5(?P<shard>\.shard\d+of\d+)?(\.partial)?")  # a cache, its shards, partial or complete


def is_cache_file(path: Path) -> bool:
    return CACHE_FILE.fullmatch(path.name) is not None


def shard_path(path: Path, rank: int, size: int) -> Path:
    """Where process `rank` of `size` writes its block of a cache (not named *.h5: never taken for a cache)."""
    return path.with_name(f"{path.name}.shard{rank}of{size}")


def join_shards(shards: Sequence[Path], path: Path, meta: CacheMeta, plan: dict[str, SplitPlan]) -> Path:
    """One cache from the complete shards of a multi-process extraction, then the shards are removed.

    Shard k holds the k-th contiguous block of rows of every split, so blocks are copied in shard order,
    CHUNK_BYTES at a time. A join cut short leaves the shards and a `.partial` that the next join redoes.
    """
    writer = CacheWriter.open(path, meta, plan)
    fingerprint = settings_fingerprint(meta.settings)
    try:
        skipped: list[str] = []
        seconds, device = 0.0, ""
        offset = dict.fromkeys(plan, 0)
        for shard in shards:
            with CacheReader(shard) as part:
                if part.fingerprint != fingerprint:
                    raise MedfmError(f"{shard} belongs to other extraction settings; remove it with `cache rm {shard}` and rerun")
                skipped += part.meta.skipped
                seconds, device = seconds + part.meta.extract_seconds, device or part.meta.extract_device  # device-seconds
                for split in part.groups:
                    names = part.stored_arrays(split)
                    n, valid = len(part.dataset(split, names[0])), part.valid(split)
                    step = min(chunk_rows(part.dataset(split, name).shape[1:], str(part.dataset(split, name).dtype), max(n, 1)) for name in names)
                    for start in range(0, n, step):
                        stop = min(start + step, n)
                        block = {name: part.read_rows(split, name, start, stop) for name in names}
                        writer.write(split, offset[split] + start, block, valid[start:stop])
                    offset[split] += n
        writer.add_skipped(skipped)
        if seconds:
            writer.add_cost(seconds, f"{device} x{len(shards)}" if device else "")
        writer.finalize()
    finally:
        writer.close()
    for shard in shards:
        shard.unlink()
    return path


def describe(path: Path) -> dict[str, Any]:
    """A summary of any cache file, complete or partial, for `cache ls` and `cache info`."""
    with h5py.File(path, "r") as file:
        meta = json.loads(file.attrs.get("meta", "{}"))
        rows = {s: (int(file[s].attrs["rows"]), int(file[s].attrs["n"])) for s in groups(file)}
        features, quantized = {}, {}
        for s in SPLITS:
            if s in file:
                features = {k: (tuple(file[s][k].shape[1:]), str(file[s][k].dtype)) for k in file[s] if k not in _NOT_FEATURES}
                quantized = {k: f"int8, one float32 scale per vector of its last axis ({scale_key(k)})" for k in file[s].get(SCALE_GROUP, {})}
                break
        return {
            "path": str(path),
            "fingerprint": str(file.attrs.get("fingerprint", "")),
            "complete": bool(file.attrs.get("complete", False)),
            "schema_version": int(file.attrs.get("schema_version", -1)),
            "rows": rows,
            "features": features,
            **({"quantized": quantized} if quantized else {}),
            "size": path.stat().st_size,
            "meta": meta,
        }


def verify(path: Path) -> list[str]:
    """Problems found in a cache file (empty when it is sound): counts, shapes, finite values, complete, and every
    checksum recomputed (each feature row, ids, labels, validity, the meta and the fingerprint of its settings)."""
    problems: list[str] = []
    try:
        file = h5py.File(path, "r")
    except OSError as err:
        return [f"unreadable: {' '.join(str(err).split())}"]
    with file:
        if file.attrs.get("schema_version") != SCHEMA_VERSION:
            return [f"schema {file.attrs.get('schema_version')} != {SCHEMA_VERSION}: written by another medfm version"]
        if not bool(file.attrs.get("complete", False)):
            problems.append("not marked complete")
        if (problem := _meta_problem(file.attrs)) is not None:
            problems.append(problem)
        for split in groups(file):
            problems += _verify_split(split, file[split])
        try:
            sources = _read_sources(file, "sources")
        except DamagedCache as err:
            problems.append(str(err).split(": ", 1)[1].split(";")[0])
        else:
            problems += _changed_sources(sources)
        try:
            _read_text(file, "text")
        except MedfmError as err:
            problems.append(str(err).split(";")[0])
        except (KeyError, ValueError) as err:
            problems.append(f"text: unreadable ({err})")
    return problems


def _changed_sources(sources: SourceFiles | None) -> list[str]:
    """`verify`'s line for source files that changed since the cache was built (an image cache's images), if any."""
    changed = sources.changed() if sources is not None else []
    if not changed:
        return []
    (path, why), more = changed[0], len(changed) - 1
    return [f"sources: {path} changed since the cache was built ({why})" + (f" and {more} more file(s) did" if more else "")
            + "; readers refuse it until it is rebuilt (`extract images ... --rebuild`)"]


META_EDITED = "meta: changed after extraction (checksum mismatch)"
FINGERPRINT_MISMATCH = "fingerprint: does not match the settings in the meta"
READER_WORDS = {META_EDITED: "its meta was changed after extraction (checksum mismatch)",
                FINGERPRINT_MISMATCH: "its settings do not hash to its fingerprint"}


def _meta_problem(attrs: h5py.AttributeManager) -> str | None:
    """What is wrong with a file's meta, if anything (`verify`'s words; readers say it as READER_WORDS)."""
    text = str(attrs.get("meta", ""))
    if attrs.get("meta_sha256") != meta_digest(text):
        return META_EDITED
    if settings_fingerprint(json.loads(text).get("settings", {})) != attrs.get("fingerprint"):
        return FINGERPRINT_MISMATCH
    return None


def _verify_split(split: str, group: h5py.Group) -> list[str]:
    problems: list[str] = []
    n, rows = int(group.attrs["n"]), int(group.attrs["rows"])
    if rows != n:
        problems.append(f"{split}: {rows} of {n} rows written")
    valid = group["valid"][:]
    for key in [*(k for k in ("ids", "labels", "valid") if k in group), *_arrays(group)]:
        if len(group[key]) != n:
            problems.append(f"{split}/{key}: {len(group[key])} rows, expected {n}")
    for key, data in (("ids", np.array(group["ids"].asstr()[:], dtype=object)), ("labels", group["labels"][:]), ("valid", valid)):
        stored = group.attrs.get(f"crc32_{key}")
        if stored is not None and int(stored) != array_crc(data):
            problems.append(f"{split}/{key}: differs from its checksum")
    try:
        _read_metadata(group, split)
    except MedfmError as err:
        problems.append(str(err).split(";")[0])
    for key in _arrays(group):
        ds, crcs = group[key], group["crc32"][key][:] if "crc32" in group and key in group["crc32"] else None
        if crcs is None:
            problems.append(f"{split}/{key}: no checksums")
            continue
        step = ds.chunks[0] if ds.chunks else max(n, 1)
        bad: list[int] = []
        finite = True
        for start in range(0, rows, step):
            block = ds[start : min(start + step, rows)]
            bad += (np.flatnonzero(row_crcs(block) != crcs[start : start + len(block)]) + start).tolist()
            finite = finite and bool(np.isfinite(block[valid[start : start + len(block)]]).all())
        if bad:
            problems.append(f"{split}/{key}: {len(bad)} row(s) differ from their checksums (first: row {bad[0]})")
        if not finite:
            problems.append(f"{split}/{key}: non-finite values")
    return problems
