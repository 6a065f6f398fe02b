"""The input policy, shared by extract and finetune: which inputs a run asks for (normalisation, channels, size,
resampling, augmented views), checked in one line each, and the transform spec they give for a backbone and a
dataset (`input_spec`), including the statistics behind `--norm dataset` and `--norm study`.

The input size must fit the backbone's patch grid. Every backbone names its input convolution
(`Backbone.first_conv`): on a ViT (DeiT, DINO, DINOv2, SAM, OpenCLIP, BLIP) it is the patch
embedding, kernel = stride = patch size and no padding, so a size that is not a multiple of the
patch silently drops the right and bottom strip (DeiT at 70 px: a 4 x 4 grid of 16 px patches covers
64 px and 6 are lost). A padded convolution (ResNet, SEEM) covers any size, and every later stage of
those families is padded too, so the first convolution decides.

The pipelines themselves (`TransformSpec`, the eval and train transforms) are `extract.transforms`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import MedfmError
from common.runtime import loader_workers
from extract.backbones import DataConfig
from extract.backbones.base import Backbone
from extract.datasets.base import DatasetSource
from extract.datasets.images import ImageDataset
from extract.transforms import TransformSpec, eval_transform, make_spec

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
    if augment != "none" and not views:
        raise MedfmError(f"--augment {augment} draws augmented train views: give --views K too (without it only the eval view, "
                         "unaugmented, is stored)")


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


MIN_IMAGE_SIZE = 16  # as extract.transforms.check_input_settings


def uncovered_pixels(conv: nn.Conv2d, size: int) -> int:
    """Rows (and columns) at the bottom (and right) of a `size` input that no window of `conv` reads."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
    if padding == "same":
        return 0
    pad = 0 if padding == "valid" else int(padding)
    dilated = conv.dilation[0] * (kernel - 1) + 1
    if size + 2 * pad < dilated:
        return size
    last_start = (size + 2 * pad - dilated) // stride * stride - pad  # the last window's first pixel
    return max(0, size - (last_start + dilated))


def check_image_size(model: Backbone, backbone: str) -> None:
    """Refuse an input size whose border the backbone's patch grid would drop, naming the nearest sizes that fit."""
    size = model.data_config.input_size
    conv = model.get_submodule(model.first_conv)
    if not isinstance(conv, nn.Conv2d):
        return
    dropped = uncovered_pixels(conv, size)
    if not dropped:
        return
    below = next((s for s in range(size - 1, MIN_IMAGE_SIZE - 1, -1) if not uncovered_pixels(conv, s)), None)
    above = next(s for s in range(size + 1, size + 4 * conv.stride[0] + 64) if not uncovered_pixels(conv, s))
    sizes = f"{below} or {above}" if below is not None else str(above)
    raise MedfmError(f"--image-size {size} does not fit {backbone}'s {conv.stride[0]}-pixel patches: the last {dropped} pixel "
                     f"rows and columns would be dropped; use --image-size {sizes}")
