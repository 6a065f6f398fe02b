"""Benchmark 5: training a DeiT head on cached tokens vs with the frozen backbone forwarded.

One epoch of the probe trainer (`probe.train.train_head`: train steps, validation, the test pass)
for a DeiT head (the cheap `deit-t` preset, 2 blocks, random start), fed either by the token cache
(`probe.data.FeatureSource`) or by `OnlineFeatures`, which decodes the images and forwards the
backbone (DeiT-S shape, 112 px, 49 tokens) for every batch.
`--smoke`: a one-block ViT backbone at 32 px, a one-block head, 20 images, one round.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from bench.common import SMOKE_IMAGE_SIZE, SMOKE_VIT, device, fastest_rounds, record, run_bench, scratch_outputs
from bench.common import DemoSizes as Sizes
from bench.online import OnlineFeatures
from cache.store import CacheReader
from extract.runner import ExtractConfig, extract
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.train import train_head

BACKBONE = "deit"


FULL = Sizes({"embed_dim": 384, "depth": 12, "num_heads": 6},  # DeiT-S shape
             112, 32,  # 128 demo images: 76 train (2 steps of 32), 26 val, 26 test
             TrainConfig(head="deit", feature="tokens", epochs=1, batch_size=32, warmup_steps=0,
                         head_preset="deit-t", head_depth=2, head_weights="random"), 3)
SMOKE = Sizes(SMOKE_VIT, SMOKE_IMAGE_SIZE, 5, replace(FULL.config, batch_size=4, head_depth=1), 1)  # 20 images: 12 train


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    dev = device()
    quiet = Console(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-deit-"))
    try:
        with scratch_outputs(work), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random DeiT start is intended here
            cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=work, image_size=s.image_size,
                                device=str(dev), dataset_options={"per_class": s.per_class}, overrides=s.overrides)
            reader = CacheReader(extract(cfg, quiet).path)
            online_features = OnlineFeatures(BACKBONE, s.overrides, s.image_size, s.per_class, s.config.feature, s.config.batch_size, dev)

            def cached() -> None:
                train_head(s.config, FeatureSource(reader, s.config.feature, s.config.batch_size), reader.task, dev)

            def online() -> None:
                train_head(s.config, online_features, reader.task, dev)

            cached()  # warm-up
            best = fastest_rounds({"online": online, "cached": cached}, s.rounds)
            reader.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"deit_epoch_online_over_cached": best["online"] / best["cached"]}
    details = {"backbone": f"{BACKBONE} {s.overrides}", "image_size": s.image_size, "tokens": list(online_features.row_shape),
               "head": f"{s.config.head_preset}, {s.config.head_depth} blocks", "batch_size": s.config.batch_size,
               "steps_per_epoch": online_features.steps_per_epoch(), "rounds": s.rounds, "seconds": {k: round(v, 3) for k, v in best.items()}}
    return record("deit_head", ratios, {}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
