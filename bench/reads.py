"""Benchmark 4: token batches read from the HDF5 cache in training order vs the same bytes from a NumPy memmap.

HDF5: a real cache file (written by `CacheWriter`) read by the probe's own streamed data path,
`probe.data.FeatureSource.train_batches`: chunks in shuffled order, a few chunks per window, rows
shuffled inside the window, batches of 64. Memmap: the same rows, saved as one `.npy`, read with the
same access pattern (windows of the same shuffled chunks, rows shuffled inside, batches of 64).
Both from the page cache (warm) and, where the OS lets us drop it, from the disk (cold: each round
drops the file's pages and opens it afresh, so no mapping keeps them alive).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.common import at_least, fastest_rounds, record, run_main
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from probe.data import FeatureSource

ROWS = 1200
TOKENS = (196, 384)  # DeiT-S tokens at 224 px; 150 KB a row in float16, 180 MB in all
BATCH = 64
ROUNDS = 3
TARGET = 0.8


def write_cache(path: Path) -> None:
    """A one-split token cache through the real writer, filled batch by batch as extraction does."""
    spec = {"tokens": FeatureSpec(TOKENS, "float16"), "pooled": FeatureSpec((TOKENS[1],), "float32")}
    plan = {"train": SplitPlan([f"r{i}" for i in range(ROWS)], np.arange(ROWS) % 4, spec)}
    meta = {"task": {"kind": "multiclass", "class_names": ["a", "b", "c", "d"], "primary_metric": "accuracy"}}
    writer = CacheWriter.open(path, "bench-reads", meta, plan)
    rng = np.random.default_rng(0)
    for start in range(0, ROWS, 32):
        n = min(32, ROWS - start)
        writer.write("train", start, {
            "tokens": rng.standard_normal((n, *TOKENS), dtype=np.float32).astype(np.float16),
            "pooled": rng.standard_normal((n, TOKENS[1]), dtype=np.float32),
        })
    writer.finalize()


def drop_from_page_cache(path: Path) -> bool:
    """Ask the OS to forget a file's cached pages, so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def memmap_batches(array: np.ndarray, chunk_rows: int, window_chunks: int, seed: int) -> Iterator[np.ndarray]:
    """One pass with the HDF5 path's access pattern, from a memmap: shuffled chunks read a window at a
    time, rows shuffled inside the window, full batches (rows left over carry into the next window)."""
    rng = np.random.default_rng(seed)
    chunks = rng.permutation(math.ceil(len(array) / chunk_rows)).tolist()
    carry = array[:0].copy()
    for i in range(0, len(chunks), window_chunks):
        window = sorted(chunks[i : i + window_chunks])
        block = np.concatenate([carry] + [array[c * chunk_rows : (c + 1) * chunk_rows] for c in window])  # copies off the map
        order = rng.permutation(len(block))
        at = 0
        while at + BATCH <= len(order):
            yield block[order[at : at + BATCH]]
            at += BATCH
        carry = block[order[at:]]


def main() -> dict:
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-reads-"))
    try:
        h5 = work / "reads.h5"
        write_cache(h5)
        npy = work / "reads.npy"
        with CacheReader(h5) as reader:
            np.save(npy, reader.features("train", "tokens"))
        array = np.load(npy, mmap_mode="r")
        reader = CacheReader(h5)
        source = FeatureSource(reader, "tokens", BATCH, max_ram=64 << 20)
        assert source.streamed, "the benchmark must exercise the streamed path"
        epoch = {"n": 0}

        def hdf5() -> None:
            epoch["n"] += 1
            for _ in source.train_batches((0, epoch["n"])):
                pass

        def memmap() -> None:
            epoch["n"] += 1
            for _ in memmap_batches(array, source.chunk_rows, source.window_chunks, epoch["n"]):
                pass

        hdf5(), memmap()
        warm = fastest_rounds({"hdf5": hdf5, "memmap": memmap}, ROUNDS)

        def cold_hdf5() -> None:
            drop_from_page_cache(h5)
            with CacheReader(h5) as fresh:
                for _ in FeatureSource(fresh, "tokens", BATCH, max_ram=64 << 20).train_batches((0, 0)):
                    pass

        def cold_memmap() -> None:
            drop_from_page_cache(npy)
            for _ in memmap_batches(np.load(npy, mmap_mode="r"), source.chunk_rows, source.window_chunks, 0):
                pass

        can_drop = drop_from_page_cache(h5)
        ratios = {"warm_hdf5_over_memmap": warm["memmap"] / warm["hdf5"]}
        details = {"rows": ROWS, "row_shape": TOKENS, "dtype": "float16", "batch": BATCH, "file_mb": round(h5.stat().st_size / 2**20),
                   "chunk_rows": source.chunk_rows, "window_chunks": source.window_chunks,
                   "warm_hdf5_mb_s": round(array.nbytes / warm["hdf5"] / 2**20), "warm_memmap_mb_s": round(array.nbytes / warm["memmap"] / 2**20)}
        if can_drop:
            cold_best = fastest_rounds({"hdf5": cold_hdf5, "memmap": cold_memmap}, ROUNDS)
            ratios["cold_hdf5_over_memmap"] = cold_best["memmap"] / cold_best["hdf5"]
            details["cold_hdf5_mb_s"] = round(array.nbytes / cold_best["hdf5"] / 2**20)
            details["cold_memmap_mb_s"] = round(array.nbytes / cold_best["memmap"] / 2**20)
        reader.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record("reads", ratios, {k: at_least(TARGET) for k in ratios}, details)


if __name__ == "__main__":
    run_main(main)
