"""Benchmark 5: training a DeiT head on cached tokens vs with the frozen backbone forwarded.

One epoch of the probe trainer (`probe.train.train_head`: train steps, validation, the test pass)
for a DeiT head (the cheap `deit-t` preset, 2 blocks, random start), fed either by the token cache
(`probe.data.FeatureSource`) or by `OnlineFeatures`, which decodes the images and forwards the
backbone (DeiT-S shape, 112 px, 49 tokens) for every batch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

from rich.console import Console

from bench.common import device, fastest_rounds, record, run_main, scratch_outputs
from bench.online import OnlineFeatures
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.train import train_head

BACKBONE, OVERRIDES = "deit", {"embed_dim": 384, "depth": 12, "num_heads": 6}  # DeiT-S shape
IMAGE_SIZE = 112
PER_CLASS = 32  # 128 demo images: 76 train (2 steps of 32), 26 val, 26 test
CONFIG = TrainConfig(head="deit", feature="tokens", epochs=1, batch_size=32, warmup_steps=0,
                     head_preset="deit-t", head_depth=2, head_weights="random")
ROUNDS = 3


def main() -> dict:
    dev = device()
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-deit-"))
    try:
        with scratch_outputs(work), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random DeiT start is intended here
            cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=work, image_size=IMAGE_SIZE,
                                device=str(dev), dataset_options={"per_class": PER_CLASS}, overrides=OVERRIDES)
            reader = CacheReader(extract(cfg, quiet).path)
            online_features = OnlineFeatures(BACKBONE, OVERRIDES, IMAGE_SIZE, PER_CLASS, CONFIG.feature, CONFIG.batch_size, dev)

            def cached() -> None:
                train_head(CONFIG, FeatureSource(reader, CONFIG.feature, CONFIG.batch_size), reader.task, dev)

            def online() -> None:
                train_head(CONFIG, online_features, reader.task, dev)

            cached()  # warm-up
            best = fastest_rounds({"online": online, "cached": cached}, ROUNDS)
            reader.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"deit_epoch_online_over_cached": best["online"] / best["cached"]}
    details = {"backbone": f"{BACKBONE} {OVERRIDES}", "image_size": IMAGE_SIZE, "tokens": list(online_features.row_shape),
               "head": f"{CONFIG.head_preset}, {CONFIG.head_depth} blocks", "batch_size": CONFIG.batch_size,
               "steps_per_epoch": online_features.steps_per_epoch(), "rounds": ROUNDS, "seconds": {k: round(v, 3) for k, v in best.items()}}
    return record("deit_head", ratios, {}, details)


if __name__ == "__main__":
    run_main(main)
