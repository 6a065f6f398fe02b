"""Input preparation, shared by extract and finetune: the input settings (normalisation, channels, size,
resampling), the transform spec they give for a backbone and a dataset, and the eval and train transforms.

The study's eval pipeline is Resize(256, 256) -> CenterCrop(224) -> Normalize: a square resize to
size / 0.875, then a centre crop (docs/protocol.md §3). Grayscale images are replicated to RGB unless
the backbone was rebuilt for one channel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from extract.corruptions import Corruption, corrupt_image

CROP_FRACTION = 0.875  # 224 / 256, the study's resize-then-crop ratio


def view_seed(seed: int, view: int, image_id: str) -> int:
    """The seed of one augmented draw, a function of the augmentation seed, the view and the image id alone.

    extract's view v and finetune's epoch v draw image i from the same seed, so a head trained on cached views
    sees what the same head trained online sees; a resumed, sharded or multi-worker run draws the same images.
    """
    digest = hashlib.sha256(f"{seed}:{view}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


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


def square_resize(resize: int, interpolation: str) -> T.Resize:
    """The first step of the eval and train transforms alone: an image cache (`extract images`) stores its output."""
    return T.Resize((resize, resize), interpolation=_interp(interpolation))


class CorruptStep:
    """A corrupted view's step (docs/robustness.md §1): the image's seed is drawn from torch's stream, which
    `ImageDataset.draw` seeds per image, so image i is corrupted alike in any worker, shard or resumed run."""

    def __init__(self, corruption: Corruption) -> None:
        self.corruption = corruption

    def __call__(self, image: Image.Image) -> Image.Image:
        return corrupt_image(image, self.corruption, int(torch.randint(0, 2**32, ())))


class Normalize:
    """uint8 pixels [..., C, H, W] -> float32 `(x / 255 - mean) / std`, on whichever device the pixels are on.

    The loader hands the device uint8 crops (a quarter of float32's bytes across the worker boundary and the host-to-device
    copy; `eval_crop`, `train_crop`) and extraction runs this on the batch there. It is torchvision's ToTensor then
    Normalize, the same operations in the same order with tensor operands (a Python scalar divisor is multiplied by its
    reciprocal on CUDA), so the tensors equal the float pipeline's (`eval_transform`, `train_transform`) to float rounding.
    """

    def __init__(self, spec: TransformSpec) -> None:
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
        self.levels = torch.tensor(255.0)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        on = pixels.device
        return pixels.float().div_(self.levels.to(on)).sub_(self.mean.to(on)).div_(self.std.to(on))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image as a contiguous uint8 tensor [C, H, W], laid out by NumPy: torchvision's `pil_to_tensor` gives a
    channels-last view, and torch's copy to [C, H, W] would fork the model's threads when an image is decoded in its
    process (`extract.datasets.images.ImageDataset`: the crops run no torch operation)."""
    pixels = np.asarray(image)
    return torch.from_numpy(np.array(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1), order="C"))


def eval_crop(spec: TransformSpec, corruption: Corruption | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (square) -> [corrupt] -> centre crop -> uint8 tensor: the eval view's pixels before `Normalize`; a clean
    `corruption` adds no step."""
    corrupt = [CorruptStep(corruption)] if corruption is not None and not corruption.clean else []
    return T.Compose([
        T.Resize((spec.resize, spec.resize), interpolation=_interp(spec.interpolation)),
        *corrupt,
        T.CenterCrop(spec.size),
        to_pixels,
    ])


def train_crop(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """The study's augmentation up to uint8 pixels: resize, centre crop, RandomResizedCrop(0.8-1.2), flips, colour jitter
    p=0.8 (every step on the PIL image, so its pixels are 8-bit already), before `Normalize`."""
    return T.Compose([
        T.Resize((spec.resize, spec.resize), interpolation=_interp(spec.interpolation)),
        T.CenterCrop(spec.size),
        T.RandomResizedCrop(spec.size, scale=(0.8, 1.2)),
        T.RandomVerticalFlip(),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8),
        to_pixels,
    ])


def eval_transform(spec: TransformSpec, corruption: Corruption | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """`eval_crop` then `Normalize` on the CPU: a normalised float32 image, for the pipelines that feed floats."""
    return T.Compose([eval_crop(spec, corruption), Normalize(spec)])


def train_transform(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """`train_crop` then `Normalize` on the CPU: the study's augmentation as a normalised float32 image."""
    return T.Compose([train_crop(spec), Normalize(spec)])
