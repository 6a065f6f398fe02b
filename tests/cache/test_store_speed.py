"""The store's speed work keeps it exact: raw-chunk reads equal HDF5's own, and opening writes no zeros up front."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from cache import store
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from tests.tiny import META

N = 23  # not a multiple of the chunk rows: the last chunk is partly beyond the data


@pytest.fixture
def cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of several small chunks per array, written batch by batch by the real writer."""
    monkeypatch.setattr(store, "CHUNK_BYTES", 64)
    features = {"pooled": FeatureSpec((4,), "float32"), "tokens": FeatureSpec((3, 2), "float16")}
    plan = {"train": SplitPlan([f"r{i}" for i in range(N)], np.arange(N) % 2, features)}
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, plan)
    rng = np.random.default_rng(0)
    for start in range(0, N, 6):
        n = min(6, N - start)
        writer.write("train", start, {"pooled": rng.standard_normal((n, 4), dtype=np.float32),
                                      "tokens": rng.standard_normal((n, 3, 2)).astype(np.float16)})
    writer.finalize()
    return path


def test_raw_chunk_reads_equal_hdf5_reads_for_every_range(cache_file: Path) -> None:
    with CacheReader(cache_file) as reader, h5py.File(cache_file, "r") as plain:
        for name in ("pooled", "tokens"):
            assert reader._raw_chunks("train", name) is not None  # the fast path is the one under test
            assert plain["train"][name].chunks[0] < N
            expected = plain["train"][name][:]
            for start in range(N + 1):
                for stop in range(start, N + 1):
                    np.testing.assert_array_equal(reader.read_rows("train", name, start, stop), expected[start:stop])
            np.testing.assert_array_equal(reader.features("train", name), expected)
            out = np.zeros((5, *expected.shape[1:]), dtype=expected.dtype)
            assert reader.read_rows("train", name, 17, 22, out) is out
            np.testing.assert_array_equal(out, expected[17:22])


def test_compressed_arrays_fall_back_to_hdf5_reads(cache_file: Path) -> None:
    with h5py.File(cache_file, "a") as file:
        data = np.arange(N * 6, dtype=np.float32).reshape(N, 6)
        file["train"].create_dataset("squeezed", data=data, chunks=(4, 6), compression="gzip")
        file["train/crc32"].create_dataset("squeezed", data=store.row_crcs(data))
    with CacheReader(cache_file) as reader:
        assert reader._raw_chunks("train", "squeezed") is None
        np.testing.assert_array_equal(reader.read_rows("train", "squeezed", 3, 19), data[3:19])
        np.testing.assert_array_equal(reader.features("train", "squeezed"), data)
        rows = np.array([0, 1, 2, 7, 11, 12, 22])
        np.testing.assert_array_equal(reader.take_rows("train", "squeezed", rows, np.empty((7, 6), np.float32)), data[rows])


def test_gathered_rows_equal_numpy_indexing_for_any_sorted_rows(cache_file: Path) -> None:
    """`take_rows` (a streamed probe's window: scattered rows, several per chunk) returns what `array[rows]` returns."""
    rng = np.random.default_rng(1)
    with CacheReader(cache_file) as reader, h5py.File(cache_file, "r") as plain:
        for name in ("pooled", "tokens"):
            expected = plain["train"][name][:]
            for size in (0, 1, 2, 5, N // 2, N):
                rows = np.sort(rng.choice(N, size, replace=False))
                out = np.empty((size, *expected.shape[1:]), dtype=expected.dtype)
                assert reader.take_rows("train", name, rows, out) is out
                np.testing.assert_array_equal(out, expected[rows])
            with pytest.raises(IndexError):  # never the padding of the last chunk
                reader.take_rows("train", name, np.array([N - 1, N]), np.empty((2, *expected.shape[1:]), dtype=expected.dtype))


def written_bytes() -> int:
    """Bytes this process has passed to write() so far (Linux /proc accounting)."""
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("wchar:")).split()[1])


def test_opening_a_cache_allocates_and_reserves_its_chunks_without_writing_them(tmp_path: Path) -> None:
    """A 100 MB plan: every chunk has its place in the file and its disk blocks at once, yet almost nothing is written."""
    plan = {"train": SplitPlan([f"r{i}" for i in range(500)], np.zeros(500, dtype=int), {"tokens": FeatureSpec((256, 384), "float16")})}
    before = written_bytes()
    writer = CacheWriter.open(tmp_path / "big.h5", META, plan)
    try:
        assert written_bytes() - before < 10e6  # not filled with zeros
        partial = tmp_path / "big.h5.partial"
        with h5py.File(partial, "r") as file:
            ds = file["train"]["tokens"]
            assert ds.id.get_num_chunks() == -(-500 // ds.chunks[0])  # allocated early: later writes change no metadata
        assert partial.stat().st_size > 90e6
        assert partial.stat().st_blocks * 512 >= partial.stat().st_size  # reserved: a full disk fails now, not mid-run
    finally:
        writer.close()


def test_batches_smaller_than_a_chunk_are_written_once_and_never_read_back(tmp_path: Path) -> None:
    """A CNN's tokens at batch 16 fill a 4 MiB chunk of 20 rows in parts: each part goes straight to its place. Through
    HDF5's chunk cache every flush read the chunk in and wrote it whole, twice the bytes of the rows."""
    rows, batch = 60, 16
    features = {"tokens": FeatureSpec((49, 2048), "float16")}
    plan = {"train": SplitPlan([f"r{i}" for i in range(rows)], np.zeros(rows, dtype=int), features)}
    tokens = np.random.default_rng(0).standard_normal((rows, 49, 2048)).astype(np.float16)
    writer = CacheWriter.open(tmp_path / "c.h5", META, plan)
    before = written_bytes()
    for start in range(0, rows, batch):
        writer.write("train", start, {"tokens": tokens[start : start + batch]})
    assert written_bytes() - before < 1.05 * tokens.nbytes  # the rows, their checksums and the row marks
    writer.finalize()
    with CacheReader(tmp_path / "c.h5") as reader:
        np.testing.assert_array_equal(reader.features("train", "tokens"), tokens)
