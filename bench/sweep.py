"""Benchmark 3: a sweep of K = 12 linear heads in one batched pass vs 12 separate runs.

Batched: `probe.sweep.run_sweep` over 4 learning rates x 3 weight decays (one pass over the features
per epoch for all twelve). Separate: `probe.run.run_probe` once per configuration. Both are the
user-level paths (`probe sweep`, `probe run`): run folders and ledger rows included, from one cache
extracted by the real runner.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.common import at_least, device, fastest_rounds, record, run_main, scratch_outputs
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from probe.results import Ledger
from probe.run import run_probe
from probe.sweep import run_sweep
from probe.train import TrainConfig

BACKBONE, OVERRIDES = "deit", {"embed_dim": 384, "depth": 4, "num_heads": 6}
IMAGE_SIZE = 64
PER_CLASS = 150  # 600 demo images: 360 train
BASE = TrainConfig(head="linear", feature="pooled", epochs=20, batch_size=64, warmup_epochs=2)
CONFIGS = [replace(BASE, lr=lr, weight_decay=wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for wd in (1e-5, 1e-4, 1e-3)]
ROUNDS = 2
TARGET = 3.0


def main() -> dict:
    dev = str(device())
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-sweep-"))
    scores: dict[str, list[float]] = {}
    try:
        with scratch_outputs(work), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=work / "features", image_size=IMAGE_SIZE,
                                device=dev, dataset_options={"per_class": PER_CLASS}, overrides=OVERRIDES)
            reader = CacheReader(extract(cfg, quiet).path)

            def batched() -> None:
                outcome = run_sweep(reader, CONFIGS, device=dev, force=True, ledger=Ledger(work / "batched.sqlite"), console=quiet)
                scores["batched"] = [r.val_score for r in outcome.records]

            def separate() -> None:
                ledger = Ledger(work / "separate.sqlite")
                scores["separate"] = [run_probe(reader, c, device=dev, force=True, ledger=ledger, console=quiet).record.val_score for c in CONFIGS]

            best = fastest_rounds({"batched": batched, "separate": separate}, ROUNDS)
            reader.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gap = float(np.max(np.abs(np.array(scores["batched"]) - np.array(scores["separate"]))))
    ratios = {"separate_over_batched": best["separate"] / best["batched"]}
    details = {"heads": len(CONFIGS), "backbone": f"{BACKBONE} {OVERRIDES}", "image_size": IMAGE_SIZE, "train_rows": int(0.6 * 4 * PER_CLASS),
               "epochs": BASE.epochs, "batch_size": BASE.batch_size, "rounds": ROUNDS,
               "seconds": {k: round(v, 2) for k, v in best.items()}, "max_val_score_gap": round(gap, 6)}
    return record("sweep", ratios, {"separate_over_batched": at_least(TARGET)}, details)


if __name__ == "__main__":
    run_main(main)
