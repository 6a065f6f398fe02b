"""int8 features in the store: the values and their per-token scales are two row arrays, each checked by its own
per-row CRC-32, verified, joined from shards and described; whole-array reads come back dequantized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cache.cli import main
from cache.store import (
    CacheReader,
    CacheWriter,
    DamagedCache,
    FeatureSpec,
    SplitPlan,
    dequantize,
    describe,
    join_shards,
    scale_key,
    shard_path,
    verify,
)
from tests.cache.damage import scribble
from tests.tiny import META, run_main

ROWS, TOKENS = 10, (3, 4)
SPECS = {"pooled": FeatureSpec((4,), "float32"), "tokens": FeatureSpec(TOKENS, "int8"), scale_key("tokens"): FeatureSpec(TOKENS[:1], "float32")}


def rows(start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows whose int8 values and scales say which row they are."""
    index = np.arange(start, stop)
    values = (np.arange(np.prod(TOKENS)).reshape(TOKENS)[None] + index[:, None, None]).astype(np.int8)
    return {"pooled": np.repeat(index[:, None], 4, axis=1).astype(np.float32), "tokens": values,
            scale_key("tokens"): np.repeat((index[:, None] + 1) / 100, TOKENS[0], axis=1).astype(np.float32)}


def plan(n: int = ROWS) -> dict[str, SplitPlan]:
    return {"train": SplitPlan([f"r{i}" for i in range(n)], np.arange(n) % 3, SPECS)}


def int8_cache(path: Path) -> Path:
    writer = CacheWriter.open(path, META, plan())
    writer.write("train", 0, rows(0, ROWS))
    return writer.finalize()


def test_int8_values_and_their_scales_are_stored_and_read_back_dequantized(tmp_path: Path) -> None:
    path = int8_cache(tmp_path / "c.h5")
    expected = rows(0, ROWS)
    with CacheReader(path) as reader:
        assert reader.feature_names("train") == ["pooled", "tokens"]  # the scales are no feature
        assert reader.stored_arrays("train") == ["pooled", "tokens", "scale/tokens"]
        assert reader.scales("train", "tokens") == "scale/tokens" and reader.scales("train", "pooled") is None
        np.testing.assert_array_equal(reader.read_rows("train", "tokens", 0, ROWS), expected["tokens"])
        features = reader.features("train", "tokens")
        assert features.dtype == np.float32
        np.testing.assert_array_equal(features, dequantize(expected["tokens"], expected["scale/tokens"]))
    assert verify(path) == []
    info = describe(path)
    assert info["features"]["tokens"] == (TOKENS, "int8") and "scale/tokens" in info["quantized"]["tokens"]


@pytest.mark.parametrize("array", ["tokens", "scale/tokens"])
def test_damage_to_the_values_or_the_scales_stops_the_read_naming_the_array_and_row(tmp_path: Path, array: str) -> None:
    path = int8_cache(tmp_path / "c.h5")
    scribble(path, "train", array, 6)
    with CacheReader(path) as reader, pytest.raises(DamagedCache, match=f"train/{array} row 6 differs from its checksum"):
        reader.features("train", "tokens")
    assert verify(path) == [f"train/{array}: 1 row(s) differ from their checksums (first: row 6)"]


def test_shards_of_an_int8_cache_join_with_their_scales(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    shards = []
    for rank in range(2):
        start, stop = ROWS * rank // 2, ROWS * (rank + 1) // 2
        block = {"train": SplitPlan([f"r{i}" for i in range(start, stop)], np.arange(start, stop) % 3, SPECS)}
        writer = CacheWriter.open(shard_path(path, rank, 2), META, block)
        writer.write("train", 0, rows(start, stop))
        shards.append(writer.finalize())
    join_shards(shards, path, META, plan())
    with CacheReader(path) as reader:
        np.testing.assert_array_equal(reader.read_rows("train", "scale/tokens", 0, ROWS), rows(0, ROWS)["scale/tokens"])
    assert verify(path) == []


def test_cache_info_says_the_tokens_are_int8_with_their_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_main(main, ["info", str(int8_cache(tmp_path / "c.h5"))], monkeypatch)
    assert code == 0 and '"int8"' in out and '"quantized"' in out and "scale/tokens" in out
