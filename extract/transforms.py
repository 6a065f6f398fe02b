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
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from common.errors import MedfmError
from common.runtime import loader_workers
from extract.backbones import DataConfig
from extract.corruptions import Corruption, corrupt_image
from extract.datasets.base import DatasetSource
from extract.datasets.images import ImageDataset

CROP_FRACTION = 0.875  # 224 / 256, the study's resize-then-crop ratio
NORMS = ("model", "dataset", "study")
INTERPOLATIONS = ("model", "bilinear", "bicubic")  # model: the backbone's own; the study resized bilinearly
NORM_IMAGES = 500  # train images (evenly spaced) behind --norm dataset; the count enters the fingerprint
AUGMENTS = ("none", "study")  # study: `train_transform`, the study's train augmentation


def check_views(views: int, augment: str) -> None:
    """`--views K --augment KIND`: K augmented train views need an augmentation to draw them with."""
    if augment not in AUGMENTS:
        raise MedfmError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment}")
    if views < 0:
        raise MedfmError(f"--views must be 0 (the eval view only) or a positive number of augmented views, got {views}")
    if views and augment == "none":
        raise MedfmError(f"--views {views} needs --augment study: views drawn without augmentation would all be the eval view")


def check_study_inputs(protocol: str, source: DatasetSource, norm: str, interpolation: str, in_chans: int) -> None:
    """`--protocol study` runs on the study's inputs (docs/protocol.md §3), asked for explicitly rather than implied."""
    if protocol != "study":
        return
    wanted = {"--norm study": norm == "study", "--interpolation bilinear": interpolation == "bilinear",
              "--in-chans 1": in_chans == 1 or not source.grayscale}
    missing = [flag for flag, ok in wanted.items() if not ok]
    if missing:
        raise MedfmError(f"--protocol study runs on the study's inputs: add {' '.join(missing)} "
                         f"(the study fed {source.name} {'as one channel, ' if source.grayscale else ''}normalised with its own constants, "
                         "resized bilinearly)")


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


def check_input_settings(norm: str, in_chans: int, image_size: int | None, interpolation: str) -> None:
    """What extract and finetune both feed a backbone: normalisation, channels, input size and resampling."""
    if norm not in NORMS:
        raise MedfmError(f"--norm must be one of {', '.join(NORMS)}, got {norm}")
    if interpolation not in INTERPOLATIONS:
        raise MedfmError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation}")
    if in_chans not in (1, 3):
        raise MedfmError(f"--in-chans must be 1 (grayscale) or 3, got {in_chans}")
    if image_size is not None and image_size < 16:
        raise MedfmError(f"--image-size must be at least 16, got {image_size}")


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


def eval_transform(spec: TransformSpec, corruption: Corruption | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (square) -> [corrupt] -> centre crop -> tensor -> normalise; a clean `corruption` adds no step."""
    corrupt = [CorruptStep(corruption)] if corruption is not None and not corruption.clean else []
    return T.Compose([
        T.Resize((spec.resize, spec.resize), interpolation=_interp(spec.interpolation)),
        *corrupt,
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


def input_spec(
    source: DatasetSource, dc: DataConfig, norm: str, in_chans: int, interpolation: str, workers: int | None,
) -> tuple[TransformSpec, dict[str, Any]]:
    """The eval transform of the backbone's data config under the input settings, and how it normalises.

    `norm`: model (the backbone's mean/std), dataset (the train split's) or study (the study's constants);
    `interpolation`: model (the backbone's, bicubic for most) or a torchvision mode (the study's Resize: bilinear).
    """
    mode = dc.interpolation if interpolation == "model" else interpolation
    mean, std, how = dc.mean, dc.std, {"kind": "model"}
    if norm == "dataset":
        mean, std, how = dataset_norm(source, dc.input_size, mode, in_chans, workers)
    elif norm == "study":
        mean, std, how = study_norm(source, in_chans)
    return make_spec(dc.input_size, mean, std, mode, in_chans), how


def dataset_norm(
    source: DatasetSource, size: int, interpolation: str, channels: int, workers: int | None,
) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """Per-channel mean/std of the train images after the eval resize and crop, from an evenly spaced sample.

    The study normalises every model with its dataset's statistics rather than the model's own.
    """
    if "train" not in source.splits:
        raise MedfmError(f"--norm dataset needs a train split; {source.name} has {', '.join(source.splits)}")
    plain = make_spec(size, (0.0,) * 3, (1.0,) * 3, interpolation, channels)
    count = len(source.splits["train"])
    rows = np.unique(np.linspace(0, count - 1, min(count, NORM_IMAGES)).round().astype(int)).tolist()
    data = torch.utils.data.Subset(ImageDataset(source, "train", eval_transform(plain), (channels, size, size)), rows)
    total, squares, pixels = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    for images, ok, _ in torch.utils.data.DataLoader(data, batch_size=32, num_workers=loader_workers(workers)):
        x = images[ok].double()
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
        pixels += x.shape[0] * size * size
    if pixels == 0:
        raise MedfmError(f"--norm dataset: none of the sampled train images of {source.name} could be read")
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt()
    rounded = [tuple(round(v, 6) for v in t.tolist()) for t in (mean, std)]
    return rounded[0], rounded[1], {"kind": "dataset", "images": len(rows)}


def study_norm(source: DatasetSource, channels: int) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """The study's fixed mean/std of this dataset (docs/protocol.md §1), to reproduce its inputs exactly.

    Grayscale datasets have one value, repeated when the gray image is fed as RGB (without --in-chans 1).
    """
    if source.study_norm is None:
        raise MedfmError(f"--norm study: {source.name} is not one of the study's datasets (aptos2019, isic2019, ddsm, "
                         "chexpert), so it has no study statistics; use --norm dataset")
    mean, std = source.study_norm
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise MedfmError(f"--norm study: {source.name}'s statistics are for {len(mean)} channels, not {channels}; drop --in-chans {channels}")
    return mean, std, {"kind": "study"}
