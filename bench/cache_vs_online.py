"""Benchmark 2: a linear probe trained from the cache vs the same head trained online.

Online: `probe.train.train_head` fed by `OnlineFeatures`, which decodes the images and forwards the
frozen backbone for every batch of every epoch. Cached, first experiment: `extract.runner.extract`
into a fresh cache, then `train_head` from it. Cached, each further experiment: `train_head` from the
existing cache. Same images, backbone, head, epochs, batch size and seeds throughout.
`--smoke`: a one-block ViT at 32 px, 20 images, one epoch, one round.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from bench.common import SMOKE_IMAGE_SIZE, SMOKE_VIT, at_least, device, fastest_rounds, record, run_bench, scratch_outputs
from bench.common import DemoSizes as Sizes
from bench.online import OnlineFeatures
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from probe.config import FitResult, TrainConfig
from probe.data import FeatureSource
from probe.train import train_head

BACKBONE = "deit"
TARGET = 50.0  # each further experiment on the cache: at least 50x the online pipeline


FULL = Sizes({"embed_dim": 192, "depth": 12, "num_heads": 3},  # DeiT-Ti shape, 5.5M parameters
             112, 32,  # 128 demo images: 76 train, 26 val, 26 test
             TrainConfig(head="linear", feature="pooled", epochs=10, batch_size=32, lr=1e-3, warmup_steps=5), 3)
SMOKE = Sizes(SMOKE_VIT, SMOKE_IMAGE_SIZE, 5, replace(FULL.config, epochs=1, batch_size=4, warmup_steps=1), 1)  # 20 images: 12 train


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    dev = device()
    quiet = Console(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-online-"))
    scores: dict[str, float] = {}

    def extract_into(out: Path) -> Path:
        cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=out, image_size=s.image_size,
                            device=str(dev), dataset_options={"per_class": s.per_class}, overrides=s.overrides)
        return extract(cfg, quiet).path

    def train_from_cache(path: Path) -> FitResult:
        with CacheReader(path) as reader:
            return train_head(s.config, FeatureSource(reader, s.config.feature, s.config.batch_size), reader.task, dev)

    def first() -> None:
        out = Path(tempfile.mkdtemp(dir=work))
        scores["cached"] = train_from_cache(extract_into(out)).val_score
        shutil.rmtree(out)

    def further() -> None:
        train_from_cache(cache)

    def online() -> None:
        features = OnlineFeatures(BACKBONE, s.overrides, s.image_size, s.per_class, s.config.feature, s.config.batch_size, dev)
        scores["online"] = train_head(s.config, features, features.data.task, dev).val_score

    try:
        with scratch_outputs(work):
            cache = extract_into(work / "kept")
            further()  # warm-up
            best = fastest_rounds({"online": online, "cached_first": first, "cached_further": further}, s.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"online_over_cached_first": best["online"] / best["cached_first"],
              "online_over_cached_further": best["online"] / best["cached_further"]}
    details = {"backbone": f"{BACKBONE} {s.overrides}", "image_size": s.image_size, "images": 4 * s.per_class,
               "epochs": s.config.epochs, "batch_size": s.config.batch_size, "rounds": s.rounds,
               "seconds": {k: round(v, 2) for k, v in best.items()},
               "val_accuracy": {k: round(v, 3) for k, v in scores.items()}}
    return record("cache_vs_online", ratios, {"online_over_cached_further": at_least(TARGET)}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
