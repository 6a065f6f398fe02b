"""The int8 token cache's stated bound (bench/tokens.py, METRIC_BOUND): a DeiT head trained on a tiny separable token
cache stored as int8 with per-token scales scores within the bound of the same head on its float16 tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.tokens import METRIC_BOUND, metric_change, relative_error, requantized
from cache.store import CacheReader
from probe.config import TrainConfig
from tests.probe.caches import make_cache


def test_a_deit_head_on_int8_tokens_scores_within_the_stated_bound_of_float16(tmp_path: Path) -> None:
    half = make_cache(tmp_path / "c.h5", rows={"train": 96, "val": 32, "test": 200}, tokens=(9, 16), separation=1.0)
    int8 = requantized(half, tmp_path / "q.h5", "token")
    config = TrainConfig(head="deit", feature="tokens", epochs=3, batch_size=16, lr=1e-3, warmup_steps=0, head_depth=1,
                         head_preset="deit-t", head_weights="random")
    found = metric_change(half, int8, config, torch.device("cpu"))
    assert found["reference"] > 0.5  # the head learned: a change in its score means something
    assert abs(found["change"]) <= METRIC_BOUND and found["agreement"] >= 0.95, found


def test_per_token_and_per_channel_errors_are_a_fraction_of_a_percent(tmp_path: Path) -> None:
    with CacheReader(make_cache(tmp_path / "c.h5", tokens=(9, 16))) as reader:
        tokens = reader.features("train", "tokens").astype(np.float32)
    assert all(0 < relative_error(tokens, how) < 0.01 for how in ("token", "channel"))
