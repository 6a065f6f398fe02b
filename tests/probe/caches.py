"""Tiny caches written directly with the cache writer, with the metadata `extract run` stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheWriter, FeatureSpec, SplitPlan
from tests.tiny import MULTICLASS


def make_cache(
    path: Path, *, rows: dict[str, int] | None = None, pooled_dim: int = 16, tokens: tuple[int, int] | None = (9, 8),
    task: Task | None = None, backbone: str = "deit", dataset: str = "demo", random_weights: bool = True,
    seed: int = 0, separation: float = 3.0, extra_layers: tuple[int, ...] = (), offset: float = 0.0, scale: float = 1.0,
    settings: dict | None = None,
) -> Path:
    """A complete cache whose features carry the label (linearly separable up to noise), written by CacheWriter."""
    rows = rows or {"train": 144, "val": 48, "test": 48}
    task = task or MULTICLASS
    rng = np.random.default_rng(seed)
    n_classes = len(task.class_names)
    layers = sorted({*extra_layers, 11})
    features = {}
    for layer in layers:
        suffix = "" if layer == 11 else f"@{layer}"
        features[f"pooled{suffix}"] = FeatureSpec((pooled_dim,), "float32")
        if tokens:
            features[f"tokens{suffix}"] = FeatureSpec(tokens, "float16")
    labels, plan = {}, {}
    for split, n in rows.items():
        y = rng.integers(0, n_classes, n)
        y[: min(n, n_classes)] = np.arange(min(n, n_classes))  # every class present in every split
        labels[split] = (rng.random((n, n_classes)) < 0.5).astype(np.float32) if task.kind == "multilabel" else y
        plan[split] = SplitPlan([f"{split}-{i}" for i in range(n)], labels[split], features)
    meta = CacheMeta(BackboneInfo(backbone, random_weights=random_weights), DatasetInfo(dataset), task,
                     layers=tuple(layers), num_layers=12, settings=settings or {})
    writer = CacheWriter.open(path, meta, plan)
    for split, n in rows.items():
        y = labels[split] if task.kind != "multilabel" else labels[split].argmax(1)
        arrays = {}
        for name, spec in features.items():
            x = rng.normal(size=(n, *spec.shape)).astype(np.float32)
            signal = np.eye(max(n_classes, spec.shape[-1]))[y][:, : spec.shape[-1]] * separation
            x += signal if x.ndim == 2 else signal[:, None, :]
            arrays[name] = (x * scale + offset).astype(spec.dtype)
        writer.write(split, 0, arrays)
    return writer.finalize()
