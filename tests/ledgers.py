"""Ledger rows for the ledger, report and probe tests: a dataset identity as an extraction records it, and a probe
run trained and recorded from a cache."""

from __future__ import annotations

from pathlib import Path

from cache.layout import open_cache
from ledger.records import dataset_identity
from probe.config import TrainConfig
from probe.run import run_probe
from tests.tiny import QUIET


def identity(dataset: str, size: int = 224, root: str | None = None, manifest: str = "m"):
    """The identity of `dataset` (at /data/<dataset> unless `root`) extracted at `size` px, 3 channels, model norm."""
    return dataset_identity(dataset, root=root or f"/data/{dataset}", manifest_hash=manifest, options={}, image_size=size,
                            channels=3, norm="model", interpolation="bicubic")


def train(cache: Path, **config) -> int:
    """A linear probe trained on `cache` (5 epochs unless `config` says otherwise) and recorded in the ledger: its run id."""
    with open_cache(cache, None, None) as reader:
        return run_probe(reader, TrainConfig(**{"epochs": 5, "batch_size": 16, "lr": 1e-2, **config}), console=QUIET).record.id
