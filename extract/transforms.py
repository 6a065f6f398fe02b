"""Eval and train transforms from a backbone's data config and the dataset's settings.

The study's eval pipeline is Resize(256, 256) -> CenterCrop(224) -> Normalize: a square resize to
size / 0.875, then a centre crop. Grayscale images are replicated to RGB unless the backbone was
rebuilt for one channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision import transforms as T

CROP_FRACTION = 0.875  # 224 / 256, the study's resize-then-crop ratio


@dataclass(frozen=True)
class TransformSpec:
    """Everything about preprocessing that changes features; it enters the cache fingerprint."""

    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    channels: int = 3

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def make_spec(size: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str, channels: int = 3) -> TransformSpec:
    if channels == 1:
        mean, std = mean[:1], std[:1]
    return TransformSpec(size, round(size / CROP_FRACTION), tuple(mean), tuple(std), interpolation, channels)


def _interp(name: str) -> T.InterpolationMode:
    return T.InterpolationMode(name if name in {m.value for m in T.InterpolationMode} else "bicubic")


def eval_transform(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (square) -> centre crop -> tensor -> normalise."""
    return T.Compose([
        T.Resize((spec.resize, spec.resize), interpolation=_interp(spec.interpolation)),
        T.CenterCrop(spec.size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """The study's augmentation: resize, centre crop, RandomResizedCrop(0.8-1.2), flips, colour jitter p=0.8."""
    return T.Compose([
        T.Resize((spec.resize, spec.resize), interpolation=_interp(spec.interpolation)),
        T.CenterCrop(spec.size),
        T.RandomResizedCrop(spec.size, scale=(0.8, 1.2)),
        T.RandomVerticalFlip(),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])
