"""The benchmarks' own machinery: the summary they append to, and an online baseline fed the cached data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from bench.common import SUMMARY_ENV, LeftOut, at_least, at_most, bracketed_ratios, fastest_rounds, met, record
from bench.online import OnlineFeatures
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from tests.tiny import TINY_SIZE, TINY_VIT


def test_each_record_is_appended_to_the_summary_with_its_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.json"
    monkeypatch.setenv(SUMMARY_ENV, str(summary))
    record("first", {"a_over_b": 1.25}, {"a_over_b": at_least(1.0)}, {"rows": 3})
    record("second", {"peak_over_peak": 1.2}, {"peak_over_peak": at_most(1.1)}, {})
    entries = json.loads(summary.read_text())
    assert [e["bench"] for e in entries] == ["first", "second"]
    assert entries[0]["ratios"] == {"a_over_b": 1.25} and entries[0]["details"] == {"rows": 3}
    assert entries[0]["machine"]["cores"] >= 1
    assert met(1.25, tuple(entries[0]["targets"]["a_over_b"])) and not met(1.2, tuple(entries[1]["targets"]["peak_over_peak"]))


def test_fastest_rounds_keeps_each_contenders_quickest_round() -> None:
    calls: list[str] = []
    best = fastest_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 3  # alternating, so both see the same neighbours
    assert set(best) == {"a", "b"} and all(0 <= v < 1 for v in best.values())


def test_a_contender_leaves_out_of_its_time_the_seconds_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extraction pipeline returns its model build as `LeftOut`, so only the rest of its round is held against the
    bare forward, whose model was built before the clock started."""
    clock = iter(range(0, 100, 1))
    monkeypatch.setattr("bench.common.time.perf_counter", lambda: float(next(clock)) * 4)
    best = fastest_rounds({"pipeline": lambda: LeftOut(1.5), "bare": lambda: None}, rounds=2)
    assert best == {"pipeline": 2.5, "bare": 4.0}


def test_bracketed_ratios_hold_each_run_against_the_baseline_right_around_it_and_take_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr("bench.common.time.perf_counter", lambda: now[0])

    def takes(seconds: list[float], left_out: float = 0.0) -> Callable[[], LeftOut]:
        def run() -> LeftOut:
            now[0] += seconds.pop(0)
            return LeftOut(left_out)
        return run

    baseline = takes([2, 4, 6, 4, 4, 4, 4])  # first, then after every contender's run
    pipeline = takes([3, 10, 4])  # against (2+4)/2, (6+4)/2 (round 2 disturbed) and (4+4)/2
    built = takes([5, 6, 9], left_out=1)  # its runs less the 1 s it leaves out, 4, 5 and 8, against (4+6)/2, (4+4)/2, (4+4)/2
    timed = bracketed_ratios(baseline, {"pipeline": pipeline, "built": built}, rounds=3)
    assert timed.rounds == {"pipeline": [1.0, 0.5, 1.0], "built": [1.25, 0.8, 0.5]}
    assert timed.ratio("pipeline") == 1.0 and timed.ratio("built") == 0.8
    assert timed.fastest == {"baseline": 2, "pipeline": 3, "built": 4}


def test_online_features_are_the_features_the_cache_holds(tmp_path: Path) -> None:
    """The online baseline differs from the cache only by recomputing: same rows, labels and values."""
    cfg = ExtractConfig(backbone="deit", dataset="demo", weights="random", out=tmp_path, image_size=TINY_SIZE, device="cpu",
                        dataset_options={"per_class": 5}, overrides=TINY_VIT)
    path = extract(cfg, Console(quiet=True)).path
    online = OnlineFeatures("deit", TINY_VIT, TINY_SIZE, 5, "pooled", 4, torch.device("cpu"))
    with CacheReader(path) as reader:
        for split in ("val", "test"):
            batches = list(online.eval_batches(split))
            np.testing.assert_allclose(np.concatenate([b.features for b in batches]), reader.features(split, "pooled"), atol=1e-5)
            np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), reader.labels(split))
    train = list(online.train_batches((0, 1)))
    assert len(train) == online.steps_per_epoch() == 12 // 4 and online.passes["train"] == 1
    assert all(b.features.shape == (4, TINY_VIT["embed_dim"]) for b in train)
