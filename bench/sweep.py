"""Benchmark 3: a sweep of K = 12 linear heads in one batched pass vs 12 separate runs.

Batched: `probe.sweep.run_sweep` over 4 learning rates x 3 weight decays (one pass over the features
per epoch for all twelve). Separate: `probe.run.run_probe` once per configuration. Both are the
user-level paths (`probe sweep`, `probe run`): run folders and ledger rows included.

The cache has APTOS 2019's shape under the study's split (2564 / 549 / 549 rows, 5 grades) with
768-d pooled features, written by the real `CacheWriter`: class-dependent Gaussian features, since
what is measured is the probe's training, not what the features mean.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.common import at_least, device, fastest_rounds, record, run_main, scratch_outputs
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from probe.results import Ledger
from probe.run import run_probe
from probe.sweep import run_sweep
from probe.train import TrainConfig

ROWS = {"train": 2564, "val": 549, "test": 549}
DIM, CLASSES = 768, 5
BASE = TrainConfig(head="linear", feature="pooled", epochs=10, batch_size=64, warmup_steps=10)
CONFIGS = [replace(BASE, lr=lr, weight_decay=wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for wd in (1e-5, 1e-4, 1e-3)]
ROUNDS = 2
TARGET = 3.0


def write_cache(path: Path) -> Path:
    """An APTOS-shaped cache of pooled features, split by split, batch by batch, as extraction writes it."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
    labels = {split: np.arange(n) % CLASSES for split, n in ROWS.items()}
    plan = {split: SplitPlan([f"{split}-{i}" for i in range(n)], labels[split], {"pooled": FeatureSpec((DIM,), "float32")})
            for split, n in ROWS.items()}
    meta = CacheMeta(BackboneInfo("synthetic"), DatasetInfo("aptos-shaped"),
                     Task("multiclass", tuple(f"grade{i}" for i in range(CLASSES)), "quadratic_kappa"), layers=(0,), num_layers=1)
    writer = CacheWriter.open(path, meta, plan)
    for split, n in ROWS.items():
        for start in range(0, n, 256):
            y = labels[split][start : start + 256]
            writer.write(split, start, {"pooled": centres[y] + 20 * rng.standard_normal((len(y), DIM), dtype=np.float32)})
    return writer.finalize()


def main() -> dict:
    dev = str(device())
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-sweep-"))
    scores: dict[str, list[float]] = {}
    try:
        with scratch_outputs(work), CacheReader(write_cache(work / "sweep.h5")) as reader:

            def batched() -> None:
                outcome = run_sweep(reader, CONFIGS, device=dev, force=True, ledger=Ledger(work / "batched.sqlite"), console=quiet)
                scores["batched"] = [r.val_score for r in outcome.records]

            def separate() -> None:
                ledger = Ledger(work / "separate.sqlite")
                scores["separate"] = [run_probe(reader, c, device=dev, force=True, ledger=ledger, console=quiet).record.val_score for c in CONFIGS]

            best = fastest_rounds({"batched": batched, "separate": separate}, ROUNDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gap = float(np.max(np.abs(np.array(scores["batched"]) - np.array(scores["separate"]))))
    ratios = {"separate_over_batched": best["separate"] / best["batched"]}
    details = {"heads": len(CONFIGS), "rows": ROWS, "dim": DIM, "epochs": BASE.epochs, "batch_size": BASE.batch_size, "rounds": ROUNDS,
               "seconds": {k: round(v, 2) for k, v in best.items()}, "max_val_score_gap": round(gap, 6),
               "best_val_kappa": round(max(scores["batched"]), 3)}
    return record("sweep", ratios, {"separate_over_batched": at_least(TARGET)}, details)


if __name__ == "__main__":
    run_main(main)
