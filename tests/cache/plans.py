"""Small planned caches written row by row with the cache writer, shared by the cache store and cache CLI tests: every
row's values say where it belongs (split and index), so a row in the wrong place shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.fingerprint import fingerprint
from cache.schema import CacheMeta
from cache.store import CacheWriter, FeatureSpec, SplitPlan, shard_path
from tests.tiny import META

FP = fingerprint(META.settings)


def make_plan(n: int = 10, dim: int = 4, tokens: tuple[int, int] = (3, 2)) -> dict[str, SplitPlan]:
    features = {"pooled": FeatureSpec((dim,), "float32"), "tokens": FeatureSpec(tokens, "float16")}
    return {
        s: SplitPlan([f"{s}-{i}" for i in range(n)], np.arange(n) % 3, features)
        for s in ("train", "val", "test")
    }


def rows_for(split: str, start: int, stop: int) -> dict[str, np.ndarray]:
    base = {"train": 0, "val": 100, "test": 200}[split]
    idx = np.arange(start, stop, dtype=np.float32)[:, None] + base
    return {"pooled": np.repeat(idx, 4, axis=1), "tokens": np.repeat(idx, 6, axis=1).reshape(-1, 3, 2).astype(np.float16)}


def write_all(writer: CacheWriter, batch: int = 4) -> None:
    for split in ("train", "val", "test"):
        for start in range(writer.rows(split), writer.planned(split), batch):
            stop = min(start + batch, writer.planned(split))
            writer.write(split, start, rows_for(split, start, stop))


def write_shard(path: Path, plan: dict[str, SplitPlan], rank: int, size: int, meta: CacheMeta = META, bad: str | None = None) -> Path:
    """Shard `rank` of `size`: the rank's contiguous block of every split, as an extraction process writes it."""
    blocks = {}
    for split, sp in plan.items():
        start, stop = len(sp.ids) * rank // size, len(sp.ids) * (rank + 1) // size
        blocks[split] = (start, SplitPlan(sp.ids[start:stop], sp.labels[start:stop], sp.features))
    writer = CacheWriter.open(shard_path(path, rank, size), meta, {s: b[1] for s, b in blocks.items()})
    for split, (start, block) in blocks.items():
        valid = np.array([i != bad for i in block.ids])
        writer.write(split, 0, rows_for(split, start, start + len(block.ids)), valid)
    writer.add_skipped([bad] if bad in blocks["train"][1].ids else [])
    return writer.finalize()
