"""The new backbones through the extraction runner: random and local weights, --layers, --norm dataset, --in-chans 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.store import CacheReader
from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract
from extract.transforms import eval_transform, make_spec
from tests.extract.checkpoints import official_sam_file
from tests.tiny import QUIET, TINY_SAM_REFERENCE
from tests.tiny import TINY_BACKBONES as TINY

DEMO = {"per_class": 5}  # 20 images: 12 train, 4 val, 4 test


def run(out: Path, name: str, **kw: object) -> Path:
    overrides, size, _, _ = TINY[name]
    base = dict(backbone=name, dataset="demo", weights="random", out=out, batch_size=4, image_size=size, workers=0,
                overrides=overrides, dataset_options=DEMO)
    return extract(ExtractConfig(**(base | kw)), QUIET).path


def first_train_image(tspec: dict) -> torch.Tensor:
    source = get_dataset("demo", None, **DEMO)
    spec = make_spec(tspec["size"], tuple(tspec["mean"]), tuple(tspec["std"]), tspec["interpolation"], tspec["channels"])
    image = source.load_image(source.splits["train"].images[0]).convert("L" if spec.channels == 1 else "RGB")
    return eval_transform(spec)(image)[None]


def test_sam_with_random_weights_fills_a_cache_of_trunk_features(tmp_path: Path) -> None:
    with CacheReader(run(tmp_path, "sam")) as cache:
        assert cache.features("train").shape == (12, 32)
        assert cache.features("test", "tokens").shape == (4, 16, 32)
        assert cache.meta.backbone.random_weights is True


def test_sam_with_a_local_weights_file_stores_that_models_features(tmp_path: Path) -> None:
    path, _ = official_sam_file(tmp_path, native=128)
    with CacheReader(run(tmp_path / "out", "sam", weights=str(path))) as cache:
        stored = cache.features("train")[0]
        assert cache.meta.backbone.weights["kind"] == "file" and len(cache.meta.backbone.weights["sha256"]) == 64
        x = first_train_image(cache.meta.transform)
    model = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    with torch.inference_mode():
        np.testing.assert_allclose(stored, model(x).pooled[0].numpy(), atol=1e-4)


def test_layers_store_every_seem_stage_from_one_run(tmp_path: Path) -> None:
    with CacheReader(run(tmp_path, "seem", layers=[0, 1, 2, -1])) as cache:
        shapes = {name: cache.features("val", name).shape for name in cache.feature_names("val")}
    assert shapes == {
        "pooled@0": (4, 8), "tokens@0": (4, 256, 8), "pooled@1": (4, 16), "tokens@1": (4, 64, 16),
        "pooled@2": (4, 32), "tokens@2": (4, 16, 32), "pooled": (4, 64), "tokens": (4, 4, 64),
    }


def test_dataset_norm_uses_train_statistics_and_enters_the_fingerprint(tmp_path: Path) -> None:
    path, _ = official_sam_file(tmp_path, native=64)
    model_norm, data_norm = run(tmp_path, "sam", weights=str(path)), run(tmp_path, "sam", weights=str(path), norm="dataset")
    assert model_norm != data_norm
    with CacheReader(data_norm) as cache:
        tspec, settings, stored = cache.meta.transform, cache.meta.settings, cache.features("train")[0]
    assert settings["norm"] == {"kind": "dataset", "images": 12}
    source = get_dataset("demo", None, **DEMO)
    raw = eval_transform(make_spec(64, (0.0,) * 3, (1.0,) * 3, tspec["interpolation"]))
    pixels = torch.stack([raw(source.load_image(ref).convert("RGB")) for ref in source.splits["train"].images])
    np.testing.assert_allclose(tspec["mean"], pixels.mean((0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(tspec["std"], pixels.std((0, 2, 3), unbiased=False).numpy(), atol=1e-5)
    model = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    with torch.inference_mode():  # the stored features come from images normalised with those statistics
        np.testing.assert_allclose(stored, model(first_train_image(tspec)).pooled[0].numpy(), atol=1e-4)


def test_grayscale_extraction_feeds_one_channel_normalised_by_the_train_split(tmp_path: Path) -> None:
    with CacheReader(run(tmp_path, "seem", in_chans=1, norm="dataset")) as cache:
        assert cache.meta.transform["channels"] == 1 and len(cache.meta.transform["mean"]) == 1
        assert cache.features("train", "tokens").shape == (12, 4, 64)


@pytest.mark.parametrize("bad", [dict(norm="imagenet"), dict(in_chans=2), dict(image_size=8), dict(interpolation="lanczos")])
def test_bad_input_settings_are_a_clear_error(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(MedfmError, match="--norm|--in-chans|--image-size|--interpolation"):
        run(tmp_path, "seem", **bad)
