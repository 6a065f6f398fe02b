"""Benchmark 4: token batches read from the HDF5 cache in training order vs the same bytes from a NumPy memmap.

HDF5: a real cache file (written by `CacheWriter`) read by the probe's own streamed data path,
`probe.data.FeatureSource.train_batches`: chunks in shuffled order, a few chunks per window, rows
shuffled inside the window, batches of 64. Memmap: the same rows, saved as one `.npy`, read with the
same access pattern (windows of as many shuffled chunks, rows shuffled inside, batches of 64).
Both read from the page cache, where a cache that fits in RAM lives after its first epoch. A file
too large for RAM is read from the disk either way, and the cache reader then copies its raw chunks
off a memory map just as the memmap does, so the disk's speed bounds both alike.
`--smoke`: 400 rows of 49 x 384 tokens (four chunks), batches of 8, an 8 MiB budget (still streamed), one round.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import at_least, fastest_rounds, record, run_bench
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from probe.data import FeatureSource

TARGET = 0.8


@dataclass(frozen=True)
class Sizes:
    rows: int
    tokens: tuple[int, int]
    batch: int
    rounds: int
    max_ram: int  # the probe's RAM budget: below the file's size, so that it streams


FULL = Sizes(1200,
             (196, 384),  # DeiT-S tokens at 224 px; 150 KB a row in float16, 180 MB in all
             64,
             15,  # a pass takes a tenth of a second: many rounds cost little and steady the minimum
             64 << 20)
SMOKE = Sizes(400, (49, 384), 8, 1, 8 << 20)  # 15 MB in all, 111 rows a 4 MiB chunk


def write_cache(path: Path, rows: int, tokens: tuple[int, int]) -> None:
    """A one-split token cache through the real writer, filled batch by batch as extraction does."""
    spec = {"tokens": FeatureSpec(tokens, "float16"), "pooled": FeatureSpec((tokens[1],), "float32")}
    plan = {"train": SplitPlan([f"r{i}" for i in range(rows)], np.arange(rows) % 4, spec)}
    meta = CacheMeta(BackboneInfo("synthetic"), DatasetInfo("synthetic"), Task("multiclass", ("a", "b", "c", "d")), layers=(0,), num_layers=1)
    writer = CacheWriter.open(path, meta, plan)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 32):
        n = min(32, rows - start)
        writer.write("train", start, {
            "tokens": rng.standard_normal((n, *tokens), dtype=np.float32).astype(np.float16),
            "pooled": rng.standard_normal((n, tokens[1]), dtype=np.float32),
        })
    writer.finalize()


def memmap_batches(array: np.ndarray, chunk_rows: int, window_chunks: int, seed: int, batch: int) -> Iterator[np.ndarray]:
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
        while at + batch <= len(order):
            yield block[order[at : at + batch]]
            at += batch
        carry = block[order[at:]]


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-reads-"))
    try:
        h5, npy = work / "reads.h5", work / "reads.npy"
        write_cache(h5, s.rows, s.tokens)
        with CacheReader(h5) as reader:
            np.save(npy, reader.features("train", "tokens"))
            array = np.load(npy, mmap_mode="r")
            source = FeatureSource(reader, "tokens", s.batch, max_ram=s.max_ram)
            assert source.streamed, "the benchmark must exercise the streamed path"
            epoch = {"n": 0}

            def hdf5() -> None:
                epoch["n"] += 1
                for _ in source.train_batches((0, epoch["n"])):
                    pass

            def memmap() -> None:
                epoch["n"] += 1
                for _ in memmap_batches(array, source.chunk_rows, source.window_chunks, epoch["n"], s.batch):
                    pass

            hdf5(), memmap()  # warm-up: both files in the page cache
            best = fastest_rounds({"hdf5": hdf5, "memmap": memmap}, s.rounds)
        ratios = {"hdf5_over_memmap": best["memmap"] / best["hdf5"]}
        details = {"rows": s.rows, "row_shape": s.tokens, "dtype": "float16", "batch": s.batch, "file_mb": round(h5.stat().st_size / 2**20),
                   "chunk_rows": source.chunk_rows, "window_chunks": source.window_chunks, "rounds": s.rounds,
                   "hdf5_mb_s": round(array.nbytes / best["hdf5"] / 2**20), "memmap_mb_s": round(array.nbytes / best["memmap"] / 2**20)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record("reads", ratios, {k: at_least(TARGET) for k in ratios}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
