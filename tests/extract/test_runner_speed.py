"""The extraction speed work keeps features exact: one loader across splits, channels-last CNNs, batch sizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cache.store import CacheReader
from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.cli import parse_batch_size
from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.runner import CPU_BATCH, BackboneForward, ExtractConfig, extract, uses_channels_last
from extract.transforms import eval_transform, make_spec, to_pixels
from tests.tiny import QUIET, TINY_RESNET, TINY_SIZE, TINY_VIT


def test_cnns_run_channels_last_and_vits_do_not() -> None:
    resnet = create_backbone("resnet152", "random", image_size=TINY_SIZE, **TINY_RESNET)
    vit = create_backbone("deit", "random", image_size=TINY_SIZE, **TINY_VIT)
    assert uses_channels_last(resnet)
    assert not uses_channels_last(vit)
    forward = BackboneForward(resnet, [3], torch.device("cpu"), None)
    assert resnet.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert forward.memory_format == torch.channels_last


def test_one_loader_over_all_splits_writes_each_row_where_a_plain_forward_puts_it(tmp_path: Path) -> None:
    """A worker-fed loader shared by the splits, batches of 7 (so batches end mid-split) and a channels-last
    CNN still give, row for row, the features of a plain contiguous forward of that row's image."""
    cfg = ExtractConfig(backbone="resnet152", dataset="demo", weights="random", out=tmp_path, batch_size=7,
                        image_size=TINY_SIZE, workers=1, overrides=TINY_RESNET, dataset_options={"per_class": 5})
    result = extract(cfg, QUIET)
    model = create_backbone("resnet152", "random", image_size=TINY_SIZE, **TINY_RESNET)
    dc = model.data_config
    transform = eval_transform(make_spec(dc.input_size, dc.mean, dc.std, dc.interpolation))
    source = get_dataset("demo", None, per_class=5)
    with CacheReader(result.path) as reader:
        for split in reader.splits:
            data = ImageDataset(source, split, transform, (3, TINY_SIZE, TINY_SIZE))
            images = torch.stack([data[i][0] for i in range(len(data))])
            with torch.inference_mode():
                expected = model(images)
            assert list(reader.ids(split)) == source.splits[split].ids
            np.testing.assert_allclose(reader.features(split, "pooled"), expected.pooled.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(reader.features(split, "tokens"), expected.tokens.numpy(), rtol=1e-2, atol=1e-2)


def test_batch_size_auto_means_the_cpu_default_here_and_bad_values_are_one_line_errors() -> None:
    vit = create_backbone("deit", "random", image_size=TINY_SIZE, **TINY_VIT)
    assert BackboneForward(vit, [1], torch.device("cpu"), None).auto_batch_size((3, TINY_SIZE, TINY_SIZE)) == CPU_BATCH
    assert parse_batch_size("auto") == "auto"
    assert parse_batch_size("32") == 32
    for bad in ("0", "-4", "many"):
        with pytest.raises(MedfmError, match="--batch-size must be auto or a positive integer"):
            parse_batch_size(bad)


def test_decoding_in_line_leaves_the_model_threads_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uint8 crops (eval and augmented views) run no torch operation, so in-line decoding never switches torch's threads;
    a float transform, which normalises with torch, still runs on one."""
    switches: list[int] = []
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (switches.append(n), set_threads(n)))
    set_threads(2)  # as the model runs on a 2-core CPU (the tests run on one thread)
    try:
        cfg = ExtractConfig(backbone="resnet152", dataset="demo", weights="random", out=tmp_path, batch_size=4, workers=0,
                            image_size=TINY_SIZE, overrides=TINY_RESNET, dataset_options={"per_class": 5}, views=1, augment="study")
        result = extract(cfg, QUIET)
        assert result.extracted == 20 + 12 and switches == []
        source = get_dataset("demo", None, per_class=5)
        ImageDataset(source, "test", eval_transform(make_spec(TINY_SIZE, (0.5,) * 3, (0.2,) * 3, "bicubic")), (3, TINY_SIZE, TINY_SIZE))[0]
    finally:
        set_threads(before)
    assert switches == [1, 2]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_crops_are_laid_out_as_torchvision_lays_them_out(mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)).convert(mode)
    pixels = to_pixels(image)
    assert pixels.is_contiguous() and pixels.dtype == torch.uint8
    assert torch.equal(pixels, T.functional.pil_to_tensor(image))
