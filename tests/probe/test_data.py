"""Cache -> batches: RAM and streamed modes give the same batches; streaming stays within its memory budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import timm  # noqa: F401 - imported up front, so its import does not count as traced memory below
import torch

from bench.tokens import requantized
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from common.errors import MedfmError
from probe.config import TrainConfig
from probe.data import FeatureSource, parse_bytes
from probe.train import train_head
from tests.probe.caches import make_cache


def test_parse_bytes_reads_human_sizes():
    assert parse_bytes("2G") == 2 << 30
    assert parse_bytes("500M") == 500 << 20
    assert parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_bytes("1048576") == 1 << 20
    with pytest.raises(MedfmError, match="--max-ram"):
        parse_bytes("lots")


def _all_batches(source: FeatureSource, seed: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b.features.copy(), b.labels.copy()) for b in source.train_batches(seed)]


def test_streamed_batches_equal_ram_batches_and_cover_every_row_once(tmp_path):
    # tokens of 9x8 fp16 = 144 B/row -> ~29k rows per 4 MiB chunk; use wide rows so the split spans several chunks
    path = make_cache(tmp_path / "c.h5", rows={"train": 700, "val": 40, "test": 40}, tokens=(64, 512))
    with CacheReader(path) as reader:
        ram = FeatureSource(reader, "tokens", batch_size=32, max_ram=1 << 40)
        streamed = FeatureSource(reader, "tokens", batch_size=32, max_ram=16 << 20)
        assert (ram.mode, streamed.mode) == ("ram", "streamed")
        assert streamed.chunk_rows < 700  # the split really spans several chunks
        a, b = _all_batches(ram, (0, 1)), _all_batches(streamed, (0, 1))
        assert len(a) == len(b) == 700 // 32
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
        seen = [row.tobytes() for x, _ in a for row in x]
        assert len(set(seen)) == len(seen)  # no row twice in an epoch
        assert not np.array_equal(a[0][0], _all_batches(ram, (0, 2))[0][0])  # another epoch, another order
        for split in ("val", "test"):
            ea = np.concatenate([x.features for x in ram.eval_batches(split)])
            eb = np.concatenate([x.features for x in streamed.eval_batches(split)])
            np.testing.assert_array_equal(ea, eb)
            np.testing.assert_array_equal(ea, reader.features(split, "tokens"))


def test_training_a_deit_head_in_streamed_mode_keeps_feature_memory_under_budget_plus_margin(tmp_path):
    """A 35 MiB token cache with a 12 MiB budget trains streamed; traced numpy memory (where every feature
    read lands) peaks below the budget + a 2 MiB margin, about a third of what RAM mode would hold."""
    path = make_cache(tmp_path / "c.h5", rows={"train": 500, "val": 32, "test": 32}, tokens=(64, 512))
    budget, margin = 12 << 20, 2 << 20
    config = TrainConfig(head="deit", feature="tokens", epochs=1, batch_size=32, head_depth=1, head_preset="deit-t", head_weights="random")
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "tokens", batch_size=32, max_ram=budget)
        assert source.nbytes > 2.5 * budget and source.streamed
        tracemalloc.start()
        result = train_head(config, source, reader.task, torch.device("cpu"))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert source.passes == {"train": 1, "val": 1, "test": 1} and len(result.history) == 1
    assert peak < budget + margin, f"peak {peak / 2**20:.1f} MiB"


def test_budget_below_one_shuffle_window_is_refused(tmp_path):
    path = make_cache(tmp_path / "c.h5", rows={"train": 700, "val": 32, "test": 32}, tokens=(64, 512))
    with CacheReader(path) as reader, pytest.raises(MedfmError, match="--max-ram"):
        FeatureSource(reader, "tokens", batch_size=32, max_ram=1 << 20)


def test_rows_skipped_at_extraction_are_never_served(tmp_path):
    meta = CacheMeta(BackboneInfo("deit"), DatasetInfo("demo"), Task("multiclass", ("a", "b")), layers=(0,), num_layers=1)
    plan = {s: SplitPlan([f"{s}{i}" for i in range(10)], np.arange(10) % 2, {"pooled": FeatureSpec((2,), "float32")}) for s in ("train", "val", "test")}
    writer = CacheWriter.open(tmp_path / "c.h5", meta, plan)
    valid = np.ones(10, dtype=bool)
    valid[[3, 7]] = False
    for s in plan:
        writer.write(s, 0, {"pooled": np.tile(np.arange(10, dtype=np.float32)[:, None], (1, 2))}, valid)
    path = writer.finalize()
    with CacheReader(path) as reader:
        for max_ram in (1 << 30, 1 << 10):
            source = FeatureSource(reader, "pooled", batch_size=2, max_ram=max_ram)
            served = np.concatenate([b.features[:, 0] for b in source.train_batches((0, 0))])
            assert sorted(served.tolist()) == [0, 1, 2, 4, 5, 6, 8, 9]
            labels = np.concatenate([b.labels for b in source.train_batches((0, 0))])
            np.testing.assert_array_equal(labels, served.astype(int) % 2)
            val = np.concatenate([b.features[:, 0] for b in source.eval_batches("val")])
            assert val.tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
            np.testing.assert_array_equal(source.labels("val"), val.astype(int) % 2)


def test_a_train_split_smaller_than_one_batch_is_served_whole_in_both_modes(tmp_path):
    path = make_cache(tmp_path / "c.h5", rows={"train": 10, "val": 600, "test": 8}, tokens=(64, 512))  # big val: streams
    with CacheReader(path) as reader:
        for max_ram, mode in ((1 << 30, "ram"), (8 << 20, "streamed")):
            source = FeatureSource(reader, "tokens", batch_size=16, max_ram=max_ram)
            assert source.mode == mode
            batches = list(source.train_batches((0, 1)))
            assert [len(b.labels) for b in batches] == [10] and source.steps_per_epoch() == 1


def test_int8_tokens_stay_int8_in_ram_and_are_dequantized_per_batch_alike_in_ram_and_streamed(tmp_path):
    """An int8 cache takes about half of float16's budget; its batches are float32, equal to the stored values times
    their scales, and RAM and streamed mode serve the same ones (train, with the scales read in the same spans, and eval)."""
    half = make_cache(tmp_path / "c.h5", rows={"train": 300, "val": 40, "test": 40}, tokens=(64, 512))
    int8 = requantized(half, tmp_path / "q.h5", "token")
    with CacheReader(half) as h, CacheReader(int8) as reader:
        ram = FeatureSource(reader, "tokens", batch_size=32, max_ram=1 << 40)
        streamed = FeatureSource(reader, "tokens", batch_size=32, max_ram=10 << 20)
        assert (ram.mode, streamed.mode) == ("ram", "streamed") and streamed.window_rows < 300
        assert ram.nbytes / FeatureSource(h, "tokens", batch_size=32, max_ram=1 << 40).nbytes == pytest.approx(0.5 + 2 / 512)
        assert ram._ram["train"].dtype == np.int8  # held as stored
        a, b = _all_batches(ram, (0, 1)), _all_batches(streamed, (0, 1))
        assert len(a) == len(b) == 300 // 32 and a[0][0].dtype == np.float32
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
        for split in ("val", "test"):
            ea = np.concatenate([x.features for x in ram.eval_batches(split)])
            np.testing.assert_array_equal(ea, np.concatenate([x.features for x in streamed.eval_batches(split)]))
            np.testing.assert_array_equal(ea, reader.features(split, "tokens"))
            np.testing.assert_allclose(ea, h.features(split, "tokens").astype(np.float32), rtol=0, atol=np.abs(ea).max() / 254 * 1.001)
