"""Benchmark 9: int8 tokens (`extract run --token-dtype int8`) against float16: bytes, and a DeiT head's test metric.

The demo set is extracted twice through the runner with a small random ViT, tokens as float16 and as int8 with one
float32 scale per token (`extract.runner.quantize`). Recorded: the bytes of the int8 tokens and their scales over the
float16 tokens', and the test metric of the same DeiT head (same seeds, `probe.train.train_head`) trained on each cache,
the int8 one dequantized batch by batch (`probe.data.FeatureSource`). Its change must stay within METRIC_BOUND.

Per-channel scales (one per channel of a row's tokens, across its tokens) are measured beside them on the same float16
tokens: their relative reconstruction error, their bytes and their head's test metric (a float32 copy of the tokens
dequantized that way), so that keeping per-token scales in the cache is a measured choice.
`--smoke`: a one-block ViT at 32 px, 20 images, a one-block head, one epoch.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from bench.common import SMOKE_IMAGE_SIZE, SMOKE_VIT, at_most, device, record, run_bench, scratch_outputs
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan, scale_key
from extract.runner import INT8_LEVELS, ExtractConfig, extract, quantize
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.train import train_head

BACKBONE = "deit"
TARGET_BYTES = 0.55  # int8 tokens and their scales over float16 tokens
METRIC_BOUND = 0.02  # |test metric on int8 tokens - on float16 tokens|, same head, seeds and rows
HOW = ("token", "channel")  # one scale per token (what the cache stores) | per channel of a row, across its tokens


@dataclass(frozen=True)
class Sizes:
    overrides: dict[str, Any]
    image_size: int
    per_class: int  # demo images of each of the 4 classes
    config: TrainConfig


FULL = Sizes({"embed_dim": 192, "depth": 4, "num_heads": 3}, 64,  # 16 tokens of 192
             125,  # 500 images: 300 train, 100 val, 100 test
             # one epoch at a small learning rate: test accuracy 0.89, where 10 epochs reach 1.0 on both caches
             # and a saturated metric would hide any change
             TrainConfig(head="deit", feature="tokens", epochs=1, batch_size=32, lr=1e-5, warmup_steps=0,
                         head_preset="deit-t", head_depth=2, head_weights="random"))
SMOKE = Sizes(SMOKE_VIT, SMOKE_IMAGE_SIZE, 5, replace(FULL.config, batch_size=4, head_depth=1))


def dequantized(tokens: np.ndarray, how: str) -> np.ndarray:
    """Float tokens [N, T, D] through int8 and back, with per-token scales (the runner's `quantize`) or per-channel ones."""
    if how == "token":
        values, scales = quantize(torch.from_numpy(tokens))
        return (values.float() * scales[..., None]).numpy()
    scales = np.abs(tokens).max(axis=1, keepdims=True) / INT8_LEVELS
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.clip(np.round(tokens / scales), -INT8_LEVELS, INT8_LEVELS) * scales


def relative_error(tokens: np.ndarray, how: str) -> float:
    """RMS of the quantization error over the RMS of the tokens."""
    return float(np.sqrt(np.mean((dequantized(tokens, how) - tokens) ** 2) / np.mean(tokens**2)))


def requantized(source: Path, target: Path, how: str) -> Path:
    """A copy of cache `source` whose tokens went through int8 `how`: int8 with per-token scales as extraction stores
    them ("token"), or float32 tokens dequantized from per-channel int8 ("channel", which the cache does not store)."""
    with CacheReader(source) as reader:
        meta = reader.meta
        arrays = {split: {name: reader.features(split, name) for name in reader.feature_names(split)} for split in reader.splits}
        plan = {split: SplitPlan(list(reader.ids(split)), reader.labels(split), {}) for split in reader.splits}
    out: dict[str, dict[str, np.ndarray]] = {}
    for split, named in arrays.items():
        tokens = named.pop("tokens").astype(np.float32)
        if how == "token":
            values, scales = quantize(torch.from_numpy(tokens))
            named |= {"tokens": values.numpy(), scale_key("tokens"): scales.numpy()}
        else:
            named["tokens"] = dequantized(tokens, how)
        out[split] = named
        plan[split] = replace(plan[split], features={name: FeatureSpec(a.shape[1:], str(a.dtype)) for name, a in named.items()})
    settings = {**meta.settings, "token_dtype": "int8" if how == "token" else "float32 (per-channel int8, dequantized)"}
    writer = CacheWriter.open(target, replace(meta, settings=settings), plan)
    for split, named in out.items():
        writer.write(split, 0, named)
    return writer.finalize()


def token_bytes(path: Path) -> int:
    """Bytes of a cache's last-block tokens, their scales included, over every split."""
    with CacheReader(path) as reader:
        return sum(reader.nbytes(split, name) for split in reader.splits
                   for name in ("tokens", reader.scales(split, "tokens")) if name is not None)


def head_scores(path: Path, config: TrainConfig, dev: torch.device) -> tuple[float, np.ndarray]:
    """The test primary metric of a head trained on a cache's tokens, and its test logits."""
    with CacheReader(path) as reader, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random DeiT start is intended here
        result = train_head(config, FeatureSource(reader, config.feature, config.batch_size), reader.task, dev)
        return float(result.test_metrics[reader.task.primary_metric]), result.predictions["test"][1]


def metric_change(reference: Path, other: Path, config: TrainConfig, dev: torch.device) -> dict[str, float]:
    """The same head trained on two caches of the same images: each one's test metric, the change, the share of test
    rows whose prediction is the same, and how far the test logits moved (relative L2): a saturated metric hides it."""
    base, base_logits = head_scores(reference, config, dev)
    score, logits = head_scores(other, config, dev)
    return {"reference": base, "other": score, "change": score - base,
            "agreement": float(np.mean(base_logits.argmax(1) == logits.argmax(1))),
            "logit_change": float(np.linalg.norm(logits - base_logits) / np.linalg.norm(base_logits))}


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    dev = device()
    quiet = Console(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-tokens-"))
    try:
        with scratch_outputs(work):
            cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=work / "features", image_size=s.image_size,
                                device=str(dev), dataset_options={"per_class": s.per_class}, overrides=s.overrides)
            half = extract(cfg, quiet).path
            int8 = extract(replace(cfg, token_dtype="int8"), quiet).path
            with CacheReader(half) as reader:
                tokens = reader.features("train", "tokens").astype(np.float32)
            shape = tokens.shape[1:]
            errors = {how: relative_error(tokens, how) for how in HOW}
            per_token = metric_change(half, int8, s.config, dev)
            per_channel = metric_change(half, requantized(half, work / "channel.h5", "channel"), s.config, dev)
            stored = token_bytes(int8) / token_bytes(half)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"int8_token_bytes_over_float16": stored, "int8_deit_test_metric_change": abs(per_token["change"]),
              "per_channel_deit_test_metric_change": abs(per_channel["change"])}
    targets = {"int8_token_bytes_over_float16": at_most(TARGET_BYTES), "int8_deit_test_metric_change": at_most(METRIC_BOUND)}
    details = {"backbone": f"{BACKBONE} {s.overrides}", "image_size": s.image_size, "images": 4 * s.per_class, "tokens": list(shape),
               "head": f"{s.config.head_preset}, {s.config.head_depth} blocks, {s.config.epochs} epochs", "metric_bound": METRIC_BOUND,
               "relative_error": {how: round(e, 5) for how, e in errors.items()},
               "per_channel_bytes_over_float16": round((shape[0] * shape[1] + 4 * shape[1]) / (2 * shape[0] * shape[1]), 4),
               "per_token": {k: round(v, 4) for k, v in per_token.items()}, "per_channel": {k: round(v, 4) for k, v in per_channel.items()}}
    return record("tokens", ratios, targets, details, smoke)


if __name__ == "__main__":
    run_bench(main)
