"""Images for end-to-end training: extract's datasets and transforms, sharded across ranks.

Every split goes through a DistributedSampler, in one process too (a world of one), so the
shuffle order is a function of (seed, epoch) alone: a resumed run and a run on N processes see
the same global order. Training drops the last incomplete batch (the study's loader does);
evaluation keeps every sample, and the sampler's padding is undone when predictions are gathered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.errors import MedfmError
from extract.datasets.base import DatasetSource
from extract.datasets.images import ImageDataset
from extract.image_cache import CachedPixels, find_image_cache
from extract.transforms import TransformSpec, eval_crop, train_crop, view_seed
from finetune.distributed import World


class LabeledImages(Dataset):
    """extract's ImageDataset of uint8 crops plus each sample's label and dataset index (to gather predictions by index)."""

    def __init__(self, source: DatasetSource, split: str, transform: Callable[[Image.Image], torch.Tensor], spec: TransformSpec,
                 pixels: CachedPixels | None = None) -> None:
        self.images = ImageDataset(source, split, transform, (spec.channels, spec.size, spec.size), pixels, dtype=torch.uint8)
        labels = source.splits[split].labels
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, bool, str]:
        image, ok, error = self.images[index]
        return image, self.labels[index], index, ok, error


def make_loader(
    source: DatasetSource, split: str, spec: TransformSpec, world: World, *,
    batch_size: int, train: bool, augment: bool, seed: int, workers: int | None, pixels: CachedPixels | None = None,
) -> tuple[DataLoader, DistributedSampler]:
    """The loader of one split for this rank; `batch_size` is the global batch, split evenly across ranks; `pixels`: an image
    cache of these images (`find_pixels`) to read them from. It hands over uint8 crops (`extract.transforms.eval_crop`,
    `train_crop`), a quarter of float32's bytes through worker IPC and the host-to-device copy: the training loop
    normalises them on the device (`extract.transforms.Normalize`)."""
    if len(source.splits.get(split, ())) == 0:
        raise MedfmError(f"dataset '{source.name}' has no '{split}' images; finetune needs train, val and test splits")
    transform = train_crop(spec) if train and augment else eval_crop(spec)
    data = LabeledImages(source, split, transform, spec, pixels)
    sampler = DistributedSampler(data, num_replicas=world.size, rank=world.rank, shuffle=train, seed=seed, drop_last=False)
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) // world.size - 1))
    loader = DataLoader(
        data, batch_size=batch_size // world.size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=world.device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    if train and len(loader) == 0:
        raise MedfmError(f"the train split has {len(data)} images, fewer than one batch of {batch_size}; lower --batch-size")
    return loader, sampler


def find_pixels(source: DatasetSource, root: Path | None, spec: TransformSpec, image_cache: str) -> CachedPixels | None:
    """The exact image cache of these images under `spec`'s resize (`--image-cache`), or None. A JPEG-draft one is not used:
    its pixels differ from the files', and a run's key, fixed before the model and its resize are known, would not say so."""
    return find_image_cache(source, root, spec, image_cache, draft=False)


def draw_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed epoch `epoch`'s augmentation of each image from (seed, epoch, image id) (`extract.transforms.view_seed`):
    the same draws as the cache's augmented train view `epoch` extracted with `--augment-seed seed`, on any number
    of ranks and workers."""
    images = loader.dataset.images
    images.draw([view_seed(seed, epoch, i) for i in images.ids])


def check_images(ok: torch.Tensor, errors: list[str]) -> None:
    """Stop on an unreadable image, naming it: a silent zero image would be trained on."""
    if not bool(ok.all()):
        bad = next(e for e, good in zip(errors, ok.tolist(), strict=True) if not good)
        raise MedfmError(f"cannot read image {bad}; fix or remove it")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A well-mixed seed for one (run seed, epoch, rank): each epoch's randomness depends on nothing else."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
