"""finetune's loaders hand over uint8 crops and the loop normalises them on the device: the model sees the same float
tensors as the float32 pipeline (`extract.transforms.train_transform`, `eval_transform`) at a quarter of the bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.transforms import Normalize, eval_transform, train_transform, view_seed
from finetune.data import draw_epoch, make_loader
from finetune.distributed import World
from tests.extract.image_caches import photo_folder, spec


def test_the_loaders_uint8_crops_normalised_equal_the_float_pipelines_tensors(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    source, world, tspec = get_dataset("imagefolder", root), World(0, 1, torch.device("cpu")), spec()
    normalize = Normalize(tspec)
    for train, transform in ((True, train_transform(tspec)), (False, eval_transform(tspec))):
        loader, sampler = make_loader(source, "train", tspec, world, batch_size=2, train=train, augment=True, seed=0, workers=0)
        sampler.set_epoch(1)
        draw_epoch(loader, 0, 1)
        reference = ImageDataset(source, "train", transform, (tspec.channels, tspec.size, tspec.size))
        reference.draw([view_seed(0, 1, i) for i in reference.ids] if train else None)
        batches = 0
        for images, _, index, ok, _ in loader:
            assert images.dtype == torch.uint8 and bool(ok.all())
            expected = torch.stack([reference[int(i)][0] for i in index])
            assert torch.equal(normalize(images), expected)
            batches += 1
        assert batches == len(loader) > 0
