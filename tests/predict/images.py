"""A small image folder whose classes differ in colour (with noise, so no two images are alike), split into
train/val/test folders as `imagefolder` reads them, and its tiny extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from extract.runner import ExtractConfig, extract
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT_1

CLASSES = {"cyst": (200, 60, 60), "mass": (60, 200, 60), "normal": (60, 60, 200)}
PER_SPLIT = {"train": 6, "val": 3, "test": 3}


def write_folder(root: Path, seed: int = 0) -> Path:
    """root/{train,val,test}/<class>/<i>.png, 40 x 36 px RGB (not square: the resize and crop both act)."""
    rng = np.random.default_rng(seed)
    for split, count in PER_SPLIT.items():
        for name, colour in CLASSES.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (36, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def extract_folder(root: Path, out: Path, **changes) -> Path:
    """The folder's cache from a one-block DeiT with random weights at 32 px (its tokens stored as float16)."""
    settings = dict(backbone="deit", dataset="imagefolder", root=root, weights="random", out=out, batch_size=8, image_size=TINY_SIZE,
                    workers=0, device="cpu", overrides=TINY_VIT_1)
    return extract(ExtractConfig(**{**settings, **changes}), QUIET).path

