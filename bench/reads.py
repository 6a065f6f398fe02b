"""Benchmark 4: token batches read from the HDF5 cache in training order vs the same bytes from a NumPy memmap.

HDF5: a real cache file (written by `CacheWriter`) read by the probe's own streamed data path,
`probe.data.FeatureSource.train_batches`: a uniform permutation of the rows each epoch, taken a window of rows at a
time, each window read in sorted order and served in permutation order, batches of 64. Memmap: the same rows, saved
as one `.npy`, read with the same access pattern (the same permutation and windows, each window's rows gathered off
the map in sorted order).
Both read from the page cache, where a cache that fits in RAM lives after its first epoch. A file
too large for RAM is read from the disk either way, and the cache reader then copies its raw chunks
off a memory map just as the memmap does, so the disk's speed bounds both alike.
`--smoke`: 400 rows of 49 x 384 tokens (four chunks), batches of 8, an 8 MiB budget (still streamed), one round.
"""

from __future__ import annotations

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

TARGET = 0.9


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


def memmap_batches(array: np.ndarray, source: FeatureSource, epoch_seed: tuple[int, ...]) -> Iterator[np.ndarray]:
    """One pass with the HDF5 path's access pattern, from a memmap: the source's permutation of the epoch, a window of
    rows at a time, each window's rows copied off the map in sorted order, then served in permutation order."""
    order, size = source.epoch_order(epoch_seed), source.batch_size
    for w in range(0, len(order), source.window_rows):
        window = order[w : w + source.window_rows]
        rows = np.sort(window)
        block = array[rows]  # fancy indexing copies off the map, in file order
        position = np.searchsorted(rows, window)
        for b in range(0, len(window), size):
            yield block[position[b : b + size]]


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
                for _ in memmap_batches(array, source, (0, epoch["n"])):
                    pass

            hdf5(), memmap()  # warm-up: both files in the page cache
            best = fastest_rounds({"hdf5": hdf5, "memmap": memmap}, s.rounds)
        ratios = {"hdf5_over_memmap": best["memmap"] / best["hdf5"]}
        details = {"rows": s.rows, "row_shape": s.tokens, "dtype": "float16", "batch": s.batch, "file_mb": round(h5.stat().st_size / 2**20),
                   "chunk_rows": source.chunk_rows, "window_rows": source.window_rows, "rounds": s.rounds,
                   "hdf5_mb_s": round(array.nbytes / best["hdf5"] / 2**20), "memmap_mb_s": round(array.nbytes / best["memmap"] / 2**20)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record("reads", ratios, {k: at_least(TARGET) for k in ratios}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
