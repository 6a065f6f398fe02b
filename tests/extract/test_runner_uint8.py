"""uint8 from the loader to the device: the workers hand over 8-bit crops and the device normalises them, and the
tensors the model sees are the float pipeline's (ToTensor, Normalize in the worker) to float rounding, for the eval
view, the study's augmented views and the corrupted views; a quarter of the bytes cross the worker boundary."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from extract.backbones import create_backbone
from extract.corruptions import CORRUPT_VIEW, Corruption
from extract.datasets import get_dataset
from extract.runner import BackboneForward, group_images
from extract.transforms import CorruptStep, Normalize, TransformSpec, make_spec, square_resize, view_seed
from tests.tiny import TINY_SIZE, TINY_VIT_1

SPEC = make_spec(TINY_SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")


def float_eval(spec: TransformSpec, corruption: Corruption | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform as workers ran it before: floats out of ToTensor and Normalize."""
    corrupt = [CorruptStep(corruption)] if corruption is not None else []
    return T.Compose([square_resize(spec.resize, spec.interpolation), *corrupt,
                      T.CenterCrop(spec.size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def float_train(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """The study's augmentation as workers ran it before."""
    return T.Compose([square_resize(spec.resize, spec.interpolation), T.CenterCrop(spec.size),
                      T.RandomResizedCrop(spec.size, scale=(0.8, 1.2)), T.RandomVerticalFlip(), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int | None) -> torch.Tensor:
    """`transform(image)` under torch seeded with `seed`, as `ImageDataset.draw` runs a draw."""
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


@pytest.mark.parametrize(("view", "corruption"), [(None, None), (1, None), (None, Corruption("gaussian_noise", 3, seed=4))],
                         ids=["eval", "augmented view", "corrupted"])
def test_device_normalised_crops_equal_the_float_pipelines_tensors(view: int | None, corruption: Corruption | None) -> None:
    source = get_dataset("demo", None, per_class=5)
    group = "train" if view is not None else "test"
    crops = group_images(source, group, SPEC, view, 7, corruption)
    before = float_train(SPEC) if view is not None else float_eval(SPEC, corruption)
    ids = source.splits[group].ids
    seeds = ([view_seed(7, view, i) for i in ids] if view is not None else
             [view_seed(corruption.seed, CORRUPT_VIEW, i) for i in ids] if corruption is not None else [None] * len(ids))
    batch = torch.stack([crops[i][0] for i in range(len(crops))])
    assert batch.dtype == torch.uint8 and all(crops[i][1] for i in range(len(crops)))
    expected = torch.stack([seeded(before, crops.load(i), seeds[i]) for i in range(len(crops))])
    torch.testing.assert_close(Normalize(SPEC)(batch), expected, rtol=0, atol=1e-6)


def test_a_quarter_of_the_bytes_cross_the_worker_boundary() -> None:
    source = get_dataset("demo", None, per_class=5)
    crop = group_images(source, "test", SPEC, None, 0)[0][0]
    assert crop.dtype == torch.uint8 and crop.is_contiguous()
    assert crop.nbytes * 4 == float_eval(SPEC)(group_images(source, "test", SPEC, None, 0).load(0)).nbytes


def test_the_forward_normalises_uint8_on_its_device_and_takes_floats_as_they_are() -> None:
    model = create_backbone("deit", "random", image_size=TINY_SIZE, **TINY_VIT_1)
    forward = BackboneForward(model, [0], torch.device("cpu"), None, Normalize(SPEC))
    pixels = torch.randint(0, 256, (2, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8)
    torch.testing.assert_close(forward(pixels)[0].tokens, forward(Normalize(SPEC)(pixels))[0].tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="normalize"):
        BackboneForward(model, [0], torch.device("cpu"), None)(pixels)
