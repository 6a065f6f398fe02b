"""Benchmark 2: a linear probe trained from the cache vs the same head trained online.

Online: `probe.train.train_head` fed by `OnlineFeatures`, which decodes the images and forwards the
frozen backbone for every batch of every epoch. Cached, first experiment: `extract.runner.extract`
into a fresh cache, then `train_head` from it. Cached, each further experiment: `train_head` from the
existing cache. Same images, backbone, head, epochs, batch size and seeds throughout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from bench.common import at_least, device, fastest_rounds, record, run_main, scratch_outputs
from bench.online import OnlineFeatures
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from probe.config import FitResult, TrainConfig
from probe.data import FeatureSource
from probe.train import train_head

BACKBONE, OVERRIDES = "deit", {"embed_dim": 192, "depth": 12, "num_heads": 3}  # DeiT-Ti shape, 5.5M parameters
IMAGE_SIZE = 112
PER_CLASS = 32  # 128 demo images: 76 train, 26 val, 26 test
CONFIG = TrainConfig(head="linear", feature="pooled", epochs=10, batch_size=32, lr=1e-3, warmup_steps=5)
ROUNDS = 3
TARGET = 10.0


def main() -> dict:
    dev = device()
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-online-"))
    scores: dict[str, float] = {}

    def extract_into(out: Path) -> Path:
        cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=out, image_size=IMAGE_SIZE,
                            device=str(dev), dataset_options={"per_class": PER_CLASS}, overrides=OVERRIDES)
        return extract(cfg, quiet).path

    def train_from_cache(path: Path) -> FitResult:
        with CacheReader(path) as reader:
            return train_head(CONFIG, FeatureSource(reader, CONFIG.feature, CONFIG.batch_size), reader.task, dev)

    def first() -> None:
        out = Path(tempfile.mkdtemp(dir=work))
        scores["cached"] = train_from_cache(extract_into(out)).val_score
        shutil.rmtree(out)

    def further() -> None:
        train_from_cache(cache)

    def online() -> None:
        features = OnlineFeatures(BACKBONE, OVERRIDES, IMAGE_SIZE, PER_CLASS, CONFIG.feature, CONFIG.batch_size, dev)
        scores["online"] = train_head(CONFIG, features, features.data.task.to_dict(), dev).val_score

    try:
        with scratch_outputs(work):
            cache = extract_into(work / "kept")
            further()  # warm-up
            best = fastest_rounds({"online": online, "cached_first": first, "cached_further": further}, ROUNDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"online_over_cached_first": best["online"] / best["cached_first"],
              "online_over_cached_further": best["online"] / best["cached_further"]}
    details = {"backbone": f"{BACKBONE} {OVERRIDES}", "image_size": IMAGE_SIZE, "images": 4 * PER_CLASS,
               "epochs": CONFIG.epochs, "batch_size": CONFIG.batch_size, "rounds": ROUNDS,
               "seconds": {k: round(v, 2) for k, v in best.items()},
               "val_accuracy": {k: round(v, 3) for k, v in scores.items()}}
    return record("cache_vs_online", ratios, {"online_over_cached_further": at_least(TARGET)}, details)


if __name__ == "__main__":
    run_main(main)
