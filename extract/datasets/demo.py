"""`demo`: a small synthetic dataset generated on the fly (no download), so the whole job runs in minutes.

Four classes of textured shapes on noisy backgrounds (disc, ring, bars, checker), each with its own
tint; the class is visible to the eye and to any reasonable feature extractor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Split, Task, as_int, stratified_split
from extract.datasets.registry import DatasetEntry, register

CLASSES = ("disc", "ring", "bars", "checker")
TINTS = np.array([[1.0, 0.55, 0.45], [0.5, 0.9, 0.55], [0.5, 0.6, 1.0], [0.95, 0.9, 0.45]])
SIZE = 96
TASK = Task("multiclass", CLASSES, "accuracy")


@dataclass(frozen=True)
class DemoImages:
    """Renders image `ref = (seed, index, label)` deterministically; picklable for loader workers."""

    def __call__(self, ref: tuple[int, int, int]) -> Image.Image:
        seed, index, label = ref
        rng = np.random.default_rng([seed, index])
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        r = np.hypot(yy - cy, xx - cx)
        scale = rng.uniform(0.18, 0.3)
        if label == 0:
            mask = r < scale
        elif label == 1:
            mask = np.abs(r - scale) < 0.05
        elif label == 2:
            mask = (np.sin(xx * rng.uniform(18, 26) + rng.uniform(0, 6)) > 0.3) & (r < scale * 1.6)
        else:
            k = rng.uniform(10, 14)
            mask = ((np.floor(yy * k) + np.floor(xx * k)) % 2 == 0) & (r < scale * 1.6)
        base = rng.uniform(0.15, 0.35) + 0.08 * rng.standard_normal((SIZE, SIZE))
        img = np.repeat(base[..., None], 3, axis=2)
        img[mask] = TINTS[label] * rng.uniform(0.75, 1.0)
        img += 0.04 * rng.standard_normal(img.shape)
        return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def build(root: Path | None = None, *, per_class: int = 60, split_seed: int = 0, **_: object) -> DatasetSource:
    """`per_class` images of each class (at least 1; fewer than 5 cannot be stratified and the split says so),
    split 60/20/20 by `split_seed`."""
    per_class, split_seed = as_int(per_class, "per_class"), as_int(split_seed, "split_seed")
    if per_class < 1:
        raise MedfmError(f"--opt per_class={per_class} must be at least 1 (images of each of the {len(CLASSES)} classes)")
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    ids = [f"demo-{i:05d}" for i in range(len(labels))]
    parts = stratified_split(ids, labels, (0.6, 0.2, 0.2), seed=split_seed, classes=CLASSES)
    splits = {
        name: Split([ids[i] for i in idx], labels[idx], [(split_seed, int(i), int(labels[i])) for i in idx])
        for name, idx in parts.items()
    }
    return DatasetSource(
        name="demo",
        task=TASK,
        splits=splits,
        load_image=DemoImages(),
        options={"per_class": per_class, "split_seed": split_seed},
    )


register(DatasetEntry(
    name="demo", description="synthetic shapes, generated on the fly (no download)",
    task="multiclass, 4 classes; accuracy", layout="nothing (no --root)", build=build,
))
