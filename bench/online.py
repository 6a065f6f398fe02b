"""Online features: what a probe without a cache trains on, for the cache-vs-online benchmarks.

`OnlineFeatures` serves the probe trainer (`probe.train.fit`) the same interface as
`probe.data.FeatureSource`, but every batch of every epoch is decoded, transformed and forwarded
through the frozen backbone again, exactly as online probing does. Same images, transform and
backbone code path as extraction (`extract.runner.BackboneForward`), so the two differ only by the cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from common.runtime import default_workers
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.runner import BackboneForward, autocast_dtype
from extract.transforms import eval_transform, make_spec
from probe.data import EVAL_BATCH, Batch


class OnlineFeatures:
    """Features of the demo set computed on the fly by a frozen backbone, batch by batch, epoch after epoch."""

    def __init__(self, backbone: str, overrides: dict, image_size: int, per_class: int, feature: str, batch_size: int,
                 device: torch.device) -> None:
        self.data = get_dataset("demo", None, per_class=per_class)
        model = create_backbone(backbone, "random", image_size=image_size, **overrides)
        self.last = model.num_layers - 1
        self.forward = BackboneForward(model, [self.last], device, autocast_dtype("auto", device))
        dc = model.data_config
        self.transform = eval_transform(make_spec(dc.input_size, dc.mean, dc.std, dc.interpolation))
        self.shape = (3, dc.input_size, dc.input_size)
        self.feature, self.batch_size = feature, batch_size
        self.passes: Counter[str] = Counter()
        example = self._features(torch.zeros(1, *self.shape))
        self.row_shape = tuple(example.shape[1:])

    def labels(self, split: str) -> np.ndarray:
        return self.data.splits[split].labels

    def steps_per_epoch(self) -> int:
        return len(self.data.splits["train"]) // self.batch_size

    def train_batches(self, epoch_seed: tuple[int, ...]) -> Iterator[Batch]:
        """Shuffled full batches of the train split, each forwarded through the backbone now."""
        self.passes["train"] += 1
        order = np.random.default_rng(list(epoch_seed)).permutation(len(self.data.splits["train"]))
        batches = [order[b : b + self.batch_size].tolist() for b in range(0, self.steps_per_epoch() * self.batch_size, self.batch_size)]
        yield from self._batches("train", batches)

    def eval_batches(self, split: str) -> Iterator[Batch]:
        self.passes[split] += 1
        n = len(self.data.splits[split])
        yield from self._batches(split, [list(range(b, min(b + EVAL_BATCH, n))) for b in range(0, n, EVAL_BATCH)])

    def _batches(self, split: str, batches: list[list[int]]) -> Iterator[Batch]:
        images = ImageDataset(self.data, split, self.transform, self.shape)
        workers = min(default_workers(self.forward.device), len(batches))
        loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=workers,
                                             pin_memory=self.forward.device.type == "cuda")
        labels = self.labels(split)
        for rows, (x, _, _) in zip(batches, loader, strict=True):
            yield Batch(self._features(x).float().cpu().numpy(), labels[rows])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.forward(images)[self.last]
        return feats.pooled if self.feature == "pooled" else feats.tokens
