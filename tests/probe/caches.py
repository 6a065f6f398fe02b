"""Tiny caches written directly with the cache writer, with the metadata `extract run` stores: a separable cache
(`make_cache`), one named and set as an extraction's (`clean_cache`), and caches derived from it, such as corrupted
views (`derived`, `view`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from tests.tiny import MULTICLASS


def make_cache(
    path: Path, *, rows: dict[str, int] | None = None, pooled_dim: int = 16, tokens: tuple[int, int] | None = (9, 8),
    task: Task | None = None, backbone: str = "deit", dataset: str = "demo", random_weights: bool = True,
    seed: int = 0, separation: float = 3.0, extra_layers: tuple[int, ...] = (), offset: float = 0.0, scale: float = 1.0,
    settings: dict | None = None, weights: dict | None = None,
) -> Path:
    """A complete cache whose features carry the label (linearly separable up to noise), written by CacheWriter; `weights`
    is the backbone's weights identity (`--weights random:3`: {"kind": "random", "seed": 3})."""
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
    meta = CacheMeta(BackboneInfo(backbone, random_weights=random_weights, weights=weights or {}), DatasetInfo(dataset), task,
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


# an extraction's settings, as `extract run` stores them in a cache
SETTINGS = {"backbone": "deit", "weights": {"kind": "random"}, "overrides": {"depth": 12}, "decoder": 1, "root": "/data/demo",
            "dataset": "demo", "dataset_options": {}, "manifest_hash": "m", "norm": {"kind": "model"}, "precision": "fp32",
            "transform": {"size": 32, "resize": 36, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "channels": 3},
            "layers": [11], "tokens": True, "token_dtype": "float16", "views": None, "protocol": "medfm"}


def clean_cache(outputs: Path) -> Path:
    """A cache named as `extract run` names one, with an extraction's settings, 4 separable classes."""
    folder = outputs / "features" / "deit"
    folder.mkdir(parents=True)
    return make_cache(folder / "demo-0123456789ab.h5", settings=SETTINGS, separation=2.0)


def derived(clean: Path, path: Path, *, noise: float = 0.0, settings: dict | None = None, relabel=None, **meta) -> Path:
    """A cache of `clean`'s test split alone (a corrupted view, another dataset): its features plus `noise` x N(0, 1),
    its labels through `relabel`, its meta and settings changed as given."""
    rng = np.random.default_rng(1)
    with CacheReader(clean) as reader:
        names = reader.feature_names("test")
        arrays = {name: reader.features("test", name) for name in names}
        labels = reader.labels("test") if relabel is None else relabel(reader.labels("test"))
        plan = {"test": SplitPlan(list(reader.ids("test")), labels,
                                  {name: FeatureSpec(a.shape[1:], str(a.dtype)) for name, a in arrays.items()})}
        new: CacheMeta = replace(reader.meta, settings={**reader.meta.settings, **(settings or {})}, **meta)
    writer = CacheWriter.open(path, new, plan)
    writer.write("test", 0, {name: (a + noise * rng.normal(size=a.shape)).astype(a.dtype) for name, a in arrays.items()})
    return writer.finalize()


def view(clean: Path, kind: str, severity: int, noise: float) -> Path:
    """The corrupted view `<stem>+<kind>-<severity>.h5` as `extract run --corrupt` lays it out (docs/robustness.md §1)."""
    corruption = {"kind": kind, "severity": severity, "seed": 0}
    return derived(clean, clean.with_name(f"{clean.stem}+{kind}-{severity}.h5"), noise=noise, settings={"corrupt": corruption},
                   corruption=corruption)


# the task of another dataset ("derm", three classes), for a cache derived as that dataset's (`derived(..., task=DERM)`)
DERM = Task("multiclass", ("A", "B", "C"), "accuracy")
