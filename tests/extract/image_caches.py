"""Image-cache fixtures: photo folders, the tiny extraction settings that read them, and the tensors a transform gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.images import photo
from extract.datasets.images import ImageDataset
from extract.runner import ExtractConfig
from extract.transforms import eval_transform, make_spec, train_transform, view_seed
from tests.tiny import TINY_SIZE, TINY_VIT

RESIZE = round(TINY_SIZE / 0.875)  # 37: the resize of a 32 px input

def photo_folder(root: Path, suffix: str = ".png", mode: str = "RGB", count: int = 12, size: tuple[int, int] = (90, 60)) -> Path:
    """An imagefolder tree of generated photographs (noise included, so resampling has work to do)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / f"class{i % 2}" / f"{i:02d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(rng, (size[0] + i, size[1]), fundus=i % 2 == 0).convert(mode).save(path)
    return root

def spec(channels: int = 3, interpolation: str = "bilinear"):
    return make_spec(TINY_SIZE, (0.5,) * channels, (0.25,) * channels, interpolation, channels)

def tensors(source, tspec, pixels=None, train: bool = False) -> list[torch.Tensor]:
    out = []
    for split in source.splits:
        shape = (tspec.channels, tspec.size, tspec.size)
        images = ImageDataset(source, split, train_transform(tspec) if train else eval_transform(tspec), shape, pixels)
        if train:
            images.draw([view_seed(0, 3, i) for i in images.ids])
        out += [image for image, ok, _ in (images[i] for i in range(len(images))) if ok]
    return out

def features_config(out: Path, root: Path | None = None, **kw) -> ExtractConfig:
    base = dict(backbone="deit", dataset="imagefolder" if root else "demo", root=root, weights="random", out=out, batch_size=4,
                image_size=TINY_SIZE, workers=0, overrides=TINY_VIT, interpolation="bilinear", views=2, augment="study")
    return ExtractConfig(**{**base, **kw})
