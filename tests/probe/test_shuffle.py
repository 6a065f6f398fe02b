"""The probe's training shuffle is a uniform shuffle of the train rows (the study's DataLoader(shuffle=True, drop_last=True)):
batches are not tied to the order rows are stored in, RAM and streamed modes serve the same batches, and each
(data seed, epoch) gives one order.

The caches here store rows sorted by class in many small chunks (`CHUNK_BYTES` lowered), the layout where a
shuffle built from chunks fails: such a shuffle serves most batches from one chunk, hence one class.
"""

from __future__ import annotations

from math import comb, sqrt
from pathlib import Path

import numpy as np
import pytest

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task, view_group
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from probe.data import FeatureSource

N, CLASSES, CHUNK_ROWS = 2048, 4, 64  # 32 chunks of 64 rows; 8 chunks per class
ROW_BYTES = 8  # pooled: 2 x float32; column 0 holds the file row (+ OFFSET x (view + 1) in augmented view `view`)
OFFSET = 10_000


def _sorted_cache(path: Path, monkeypatch: pytest.MonkeyPatch, *, views: int = 0, valid: np.ndarray | None = None) -> Path:
    """A train split of N rows stored sorted by class, in chunks of CHUNK_ROWS rows, with `views` augmented views."""
    monkeypatch.setattr("cache.store.CHUNK_BYTES", CHUNK_ROWS * ROW_BYTES)
    labels = np.repeat(np.arange(CLASSES), N // CLASSES)
    spec = {"pooled": FeatureSpec((2,), "float32")}
    groups = {"train": N, "val": 16, "test": 16, **{view_group(v): N for v in range(views)}}
    plan = {g: SplitPlan([f"r{i}" for i in range(n)], labels[:n] if n == N else np.arange(n) % CLASSES, spec) for g, n in groups.items()}
    meta = CacheMeta(BackboneInfo("synthetic"), DatasetInfo("synthetic"), Task("multiclass", tuple("abcd")), layers=(0,), num_layers=1,
                     views=views, augment="study" if views else "none")
    writer = CacheWriter.open(path, meta, plan)
    for g, n in groups.items():
        rows = np.arange(n, dtype=np.float32) + (OFFSET * (int(g[len("train+view"):]) + 1) if g.startswith("train+view") else 0)
        writer.write(g, 0, {"pooled": np.stack([rows, rows], 1)}, valid if (valid is not None and n == N) else None)
    return writer.finalize()


def _rows(source: FeatureSource, epoch_seed: tuple[int, ...]) -> list[np.ndarray]:
    """The file rows of each batch of an epoch (column 0 of the features, less the view's offset)."""
    return [b.features[:, 0].astype(np.int64) % OFFSET for b in source.train_batches(epoch_seed)]


def _single_chunk(batches: list[np.ndarray]) -> int:
    return sum(len(np.unique(rows // CHUNK_ROWS)) == 1 for rows in batches)


def _uniform_bound(batches: int, sizes: list[int], batch: int) -> tuple[float, float]:
    """Expected count, and a bound, of the batches whose `batch` rows all come from one group of rows (sizes: the
    groups' sizes) under a uniform shuffle. Each batch of a uniform permutation is a uniform `batch`-subset, so one is
    single-group with probability p = sum_g C(n_g, B) / C(n, B); the bound is the mean + 5 sd (binomial) + 1."""
    p = sum(comb(k, batch) for k in sizes) / comb(sum(sizes), batch)
    mean = batches * p
    return mean, mean + 5 * sqrt(batches * p * (1 - p)) + 1


@pytest.mark.parametrize("batch", [2, 8])
@pytest.mark.parametrize("max_ram", [1 << 30, 8 << 10], ids=["ram", "streamed"])
def test_batches_are_no_more_often_from_one_chunk_or_one_class_than_under_a_uniform_shuffle(tmp_path, monkeypatch, batch, max_ram):
    path = _sorted_cache(tmp_path / "c.h5", monkeypatch)
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "pooled", batch_size=batch, max_ram=max_ram)
        assert source.chunk_rows == CHUNK_ROWS and source.streamed == (max_ram < 1 << 20)
        labels = reader.labels("train")
        epochs = [_rows(source, (0, e)) for e in (1, 2, 3)]
    batches = [rows for epoch in epochs for rows in epoch]
    assert len(batches) == 3 * (N // batch)
    mean, bound = _uniform_bound(len(batches), [CHUNK_ROWS] * (N // CHUNK_ROWS), batch)
    assert _single_chunk(batches) <= bound, (_single_chunk(batches), mean)
    mean, bound = _uniform_bound(len(batches), [N // CLASSES] * CLASSES, batch)
    single_class = sum(len(np.unique(labels[rows])) == 1 for rows in batches)
    assert single_class <= bound, (single_class, mean)


def test_an_epoch_serves_the_seeded_permutation_of_the_valid_rows_in_whole_batches(tmp_path, monkeypatch):
    valid = np.ones(N, dtype=bool)
    valid[::7] = False  # rows skipped at extraction
    path = _sorted_cache(tmp_path / "c.h5", monkeypatch, valid=valid)
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "pooled", batch_size=64)
        m = int(valid.sum())
        for seed in ((0, 1), (0, 2), (5, 1)):
            expected = np.random.default_rng(list(seed)).permutation(np.flatnonzero(valid))[: m // 64 * 64]
            served = np.concatenate(_rows(source, seed))
            np.testing.assert_array_equal(served, expected)  # the study's shuffle: a permutation, drop_last
            np.testing.assert_array_equal(source.epoch_order(seed), expected)
        assert source.steps_per_epoch() == m // 64


def test_the_order_is_fixed_by_the_data_seed_and_epoch_alone(tmp_path, monkeypatch):
    path = _sorted_cache(tmp_path / "c.h5", monkeypatch)
    with CacheReader(path) as reader:
        a = FeatureSource(reader, "pooled", batch_size=16, max_ram=1 << 30)
        b = FeatureSource(reader, "pooled", batch_size=16, max_ram=8 << 10)  # streamed, another instance
        first = np.concatenate(_rows(a, (0, 1)))
        for again in (_rows(a, (0, 1)), _rows(b, (0, 1))):
            np.testing.assert_array_equal(np.concatenate(again), first)
        assert len(set(first.tolist())) == len(first) == N  # every row once
        for other in ((1, 1), (0, 2)):
            assert not np.array_equal(np.concatenate(_rows(a, other)), first)


@pytest.mark.parametrize("budget", [8 << 10, 2 << 10, 1200])
def test_streamed_batches_equal_ram_batches_with_views_and_a_rows_subset(tmp_path, monkeypatch, budget):
    """Windows of several sizes (budgets), augmented views picked by epoch, a label-efficiency subset and skipped rows:
    the streamed batches are the RAM batches, and the window holds whole batches within the budget."""
    valid = np.ones(N, dtype=bool)
    valid[5::11] = False
    path = _sorted_cache(tmp_path / "c.h5", monkeypatch, views=2, valid=valid)
    subset = np.random.default_rng(3).choice(N, 1500, replace=False)
    with CacheReader(path) as reader:
        for rows in (None, subset):
            ram = FeatureSource(reader, "pooled", batch_size=24, max_ram=1 << 30, views=2, rows=rows)
            streamed = FeatureSource(reader, "pooled", batch_size=24, max_ram=budget, views=2, rows=rows)
            assert (ram.mode, streamed.mode) == ("ram", "streamed")
            w = streamed.window_rows
            assert w % 24 == 0 and w < len(streamed.epoch_order((0, 1)))  # several windows per epoch
            assert (w + 2 * 24) * ROW_BYTES <= budget  # the window and two batches: rows are gathered straight into the window
            for epoch in (1, 2, 3):
                xa = [(x.features, x.labels) for x in ram.train_batches((7, epoch))]
                xb = [(x.features, x.labels) for x in streamed.train_batches((7, epoch))]
                assert len(xa) == len(xb) == ram.steps_per_epoch()
                for (fa, la), (fb, lb) in zip(xa, xb, strict=True):
                    np.testing.assert_array_equal(fa, fb)
                    np.testing.assert_array_equal(la, lb)
                served = np.concatenate([f[:, 0] for f, _ in xa])
                view = (epoch - 1) % 2
                assert np.all(served // OFFSET == view + 1)  # epoch e reads view (e - 1) mod 2
                allowed = valid if rows is None else valid & np.isin(np.arange(N), subset)
                assert allowed[served.astype(np.int64) % OFFSET].all() and len(np.unique(served)) == len(served)
