"""Training heads from a cache: it learns, selects on validation only, scores test once, is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cache.store import CacheReader
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.train import train_head
from tests.probe.caches import make_cache
from tests.tiny import MULTILABEL

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "c.h5", separation=4.0)


def test_linear_head_learns_a_separable_cache_and_scores_test_once(cache):
    with CacheReader(cache) as reader:
        source = FeatureSource(reader, "pooled", batch_size=16)
        result = train_head(TrainConfig(lr=1e-2, epochs=15, batch_size=16, warmup_steps=9), source, reader.task, CPU)
    assert result.test_metrics["accuracy"] > 0.9
    assert result.val_score == max(h["val_accuracy"] for h in result.history)
    assert result.best_epoch == next(h["epoch"] for h in result.history if h["val_accuracy"] == result.val_score)
    assert source.passes == {"train": 15, "val": 15, "test": 1}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seeds_give_identical_heads_and_another_seed_does_not(cache):
    def weights(seed: int) -> torch.Tensor:
        with CacheReader(cache) as reader:
            source = FeatureSource(reader, "pooled", batch_size=16)
            return train_head(TrainConfig(epochs=2, batch_size=16, seed=seed), source, reader.task, CPU).state_dict["linear.weight"]

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_patience_stops_training_after_epochs_without_improvement(cache):
    with CacheReader(cache) as reader:
        source = FeatureSource(reader, "pooled", batch_size=16)
        result = train_head(TrainConfig(lr=1e-1, epochs=40, batch_size=16, patience=2), source, reader.task, CPU)
    last = result.history[-1]["epoch"]
    assert last < 40 and last - result.best_epoch == 2


def test_deit_head_trains_on_cached_tokens(cache):
    with CacheReader(cache) as reader:
        source = FeatureSource(reader, "tokens", batch_size=16)
        config = TrainConfig(head="deit", feature="tokens", lr=1e-3, epochs=2, batch_size=16, head_depth=1, head_preset="deit-t", head_weights="random")
        result = train_head(config, source, reader.task, CPU)
    assert result.head_init == "random"
    assert "blocks.0.attn.qkv.weight" in result.state_dict
    assert len(result.history) == 2 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.test_metrics["accuracy"] > 0.9  # it learned the tokens' signal (4 classes: chance is 0.25)


def test_multilabel_cache_trains_with_bce_and_reports_mean_auc(tmp_path):
    task = MULTILABEL
    path = make_cache(tmp_path / "m.h5", task=task, tokens=None)
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "pooled", batch_size=16)
        result = train_head(TrainConfig(epochs=2, batch_size=16), source, reader.task, CPU)
    assert math.isfinite(result.test_metrics["mean_roc_auc"])
    assert np.isfinite(result.val_score)


def test_standardize_lets_a_head_learn_features_with_a_large_offset_and_tiny_spread(tmp_path):
    """Random-weight ViT features look like this (a near-constant CLS with a tiny signal): raw, they teach a head nothing."""
    path = make_cache(tmp_path / "c.h5", separation=4.0, offset=1.0, scale=1e-3, tokens=None)
    scores = {}
    with CacheReader(path) as reader:
        for standardize in (False, True):
            source = FeatureSource(reader, "pooled", batch_size=16)
            result = train_head(TrainConfig(lr=1e-2, epochs=8, batch_size=16, warmup_steps=9, standardize=standardize), source, reader.task, CPU)
            scores[standardize] = result.test_metrics["accuracy"]
            assert result.state_dict["scale"].min() < (0.01 if standardize else 2)
    assert scores[True] > 0.9 and scores[False] < 0.6
