"""Views cut on the device (`extract run --pixels-on-device`): the eval view and the study's augmented views equal the PIL
path's bit for bit (parameters and pixels), an extraction with them equals one through the loader, and its mistakes are
one line each. On the CPU; `make gpu-check` is where a GPU runs it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from bench.images import photo
from cache.store import CacheReader
from common.errors import MedfmError
from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.device_views import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    DeviceViews,
    StudySteps,
    ViewDraw,
    augmented,
    draw_view,
    jittered,
)
from extract.image_cache import ImageCacheConfig, build_image_cache, find_image_cache
from extract.runner import extract
from extract.transforms import eval_crop, make_spec, train_crop, view_seed
from tests.extract.extractions import error_line, invoke
from tests.extract.image_caches import RESIZE, features_config, photo_folder, spec
from tests.tiny import QUIET, TINY_SIZE

PIL_STEPS = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}


def photos(count: int, channels: int) -> list[Image.Image]:
    """Photographs (noise included) at the image cache's size, as the image cache hands them to the transforms."""
    rng = np.random.default_rng(0)
    return [photo(rng, (RESIZE + 30 + i, RESIZE + i), fundus=i % 2 == 0).resize((RESIZE, RESIZE)).convert("L" if channels == 1 else "RGB")
            for i in range(count)]


def seeded(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """`transform(image)` under torch seeded as `ImageDataset.draw` seeds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def by_hand(image: Image.Image, draw: ViewDraw) -> torch.Tensor:
    """torchvision's own PIL operations applied with `draw`'s parameters: the PIL path with its random draws replaced."""
    image = TF.resized_crop(TF.center_crop(image, [TINY_SIZE] * 2), *draw.box, [TINY_SIZE] * 2, InterpolationMode.BILINEAR)
    image = TF.vflip(image) if draw.vflip else image
    image = TF.hflip(image) if draw.hflip else image
    for step, factor in draw.jitter:
        image = PIL_STEPS[step](image, factor)
    return TF.pil_to_tensor(image)


@pytest.mark.parametrize("channels", [3, 1])
def test_the_eval_view_from_the_held_image_cache_is_the_loaders_bit_for_bit(tmp_path: Path, channels: int) -> None:
    root = photo_folder(tmp_path / "data", mode="RGB" if channels == 3 else "L")
    build_image_cache(ImageCacheConfig("imagefolder", root, tmp_path / "images", resize=RESIZE, in_chans=channels), QUIET)
    source = get_dataset("imagefolder", root)
    pixels = find_image_cache(source, root, spec(channels), str(tmp_path / "images"))
    held = DeviceViews(pixels, source, spec(channels), torch.device("cpu"), seed=0)
    assert held.pixels.shape == (12, channels, RESIZE, RESIZE)  # every image once
    for split in source.splits:
        loader = ImageDataset(source, split, eval_crop(spec(channels)), (channels, TINY_SIZE, TINY_SIZE), pixels, dtype=torch.uint8)
        crops, ok, errors = held.batch(split, None, 0, len(loader))
        assert crops.dtype == torch.uint8 and bool(ok.all()) and not any(errors)
        assert torch.equal(crops, torch.stack([loader[i][0] for i in range(len(loader))]))


def test_the_drawn_parameters_are_those_the_pil_transforms_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded from inside the PIL pipeline (its crop box, flips and jitter) under the same seed, and replayed by
    torchvision's PIL functions into the pipeline's own views; the caller's random stream is left as it was."""
    used: dict = {}
    crop_params, jitter_params = T.RandomResizedCrop.get_params, T.ColorJitter.get_params
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(lambda *a: used.setdefault("box", tuple(crop_params(*a)))))
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *a: used.setdefault("jitter", jitter_params(*a))))
    for name in ("vflip", "hflip"):
        monkeypatch.setattr(TF, name, lambda image, name=name, flip=getattr(TF, name): used.setdefault(name, True) and flip(image))
    tspec = make_spec(TINY_SIZE, (0.5,) * 3, (0.25,) * 3, "bilinear")
    steps, pipeline, draws = StudySteps.of(tspec), train_crop(tspec), []
    for k, image in enumerate(photos(20, 3)):
        for view in range(4):
            seed = view_seed(0, view, f"image{k}")
            used.clear()
            view_pixels = seeded(pipeline, image, seed)
            recorded = dict(used)
            torch.manual_seed(5)
            expected = torch.rand(1)
            torch.manual_seed(5)
            draw = draw_view(steps, TINY_SIZE, seed)
            assert torch.rand(1) == expected
            assert draw.box == recorded["box"] and draw.vflip == ("vflip" in recorded) and draw.hflip == ("hflip" in recorded)
            order, *factors = recorded.get("jitter", ([], None, None, None, None))
            assert draw.jitter == tuple((int(s), factors[int(s)]) for s in order)
            used.clear()
            assert torch.equal(by_hand(image, draw), view_pixels), (k, view, draw)
            draws.append(draw)
    # the draws cover what they must: skipped and applied jitter, both flips, crops inside the centre crop and all of it
    assert {bool(d.jitter) for d in draws} == {d.vflip for d in draws} == {d.hflip for d in draws} == {True, False}
    assert {d.box[2] * d.box[3] < TINY_SIZE**2 for d in draws} == {True, False}


@pytest.mark.parametrize("channels", [3, 1])
def test_augmented_views_are_the_pil_pipelines_bit_for_bit(channels: int) -> None:
    """50 images x 4 views, with and without jitter: no level differs (the bound docs/images.md §5 states)."""
    tspec = make_spec(TINY_SIZE, (0.5,) * channels, (0.25,) * channels, "bilinear", channels)
    steps, pipeline, images = StudySteps.of(tspec), train_crop(tspec), photos(50, channels)
    batch = torch.stack([TF.pil_to_tensor(image) for image in images])
    jitter_free = with_jitter = 0
    for view in range(4):
        seeds = [view_seed(3, view, f"image{k}") for k in range(len(images))]
        draws = [draw_view(steps, TINY_SIZE, seed) for seed in seeds]
        device = augmented(batch, draws, TINY_SIZE)
        cpu = torch.stack([seeded(pipeline, image, seed) for image, seed in zip(images, seeds, strict=True)])
        difference = (device.int() - cpu.int()).abs()
        assert device.dtype == torch.uint8 and int(difference.max()) == 0 and float(difference.float().mean()) == 0.0
        jitter_free += sum(not d.jitter for d in draws)
        with_jitter += sum(bool(d.jitter) for d in draws)
    assert jitter_free > 10 and with_jitter > 100  # both kinds measured


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize(("step", "factors"), [(BRIGHTNESS, (0.8, 0.93, 1.2)), (CONTRAST, (0.8, 1.07, 1.2)),
                                               (SATURATION, (0.9, 0.97, 1.1)), (HUE, (-0.1, -0.0371, 0.0, 0.0629, 0.1))])
def test_each_jitter_step_is_pillows_over_many_colours(step: int, factors: tuple[float, ...], channels: int) -> None:
    """Every grey level, random colours and saturated ones, through each step at the ends and inside of its range."""
    rng = np.random.default_rng(1)
    colours = np.concatenate([np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1), rng.integers(0, 256, (65024, 3), dtype=np.uint8),
                              rng.choice(np.array([0, 255], dtype=np.uint8), (256, 3))]).reshape(256, 256, 3)
    image = Image.fromarray(colours).convert("L" if channels == 1 else "RGB")
    for factor in factors:
        factor = float(torch.tensor(factor))  # a float32 value, as ColorJitter draws it
        device = jittered(TF.pil_to_tensor(image)[None].float(), [ViewDraw((0, 0, 256, 256), False, False, ((step, factor),))])
        assert torch.equal(device[0].to(torch.uint8), TF.pil_to_tensor(PIL_STEPS[step](image, factor))), factor


def test_an_extraction_on_the_device_equals_the_loaders_and_the_fingerprint_says_which_made_the_views(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    build_image_cache(ImageCacheConfig("imagefolder", root, resize=RESIZE), QUIET)
    held = extract(features_config(tmp_path / "a", root, pixels_on_device=True), QUIET)
    loader = extract(features_config(tmp_path / "b", root), QUIET)
    assert held.path.name != loader.path.name  # augmented views made on the device: their own fingerprint
    with CacheReader(held.path) as a, CacheReader(loader.path) as b:
        assert a.meta.settings["views"] == {**b.meta.settings["views"], "on_device": True}
        assert a.groups == b.groups == ["train", "val", "test", "train+view0", "train+view1"]
        for group in a.groups:  # the same pixels, so the same features, augmented views included
            for name in ("pooled", "tokens"):
                assert np.array_equal(a.features(group, name), b.features(group, name)), (group, name)
    # the eval view only: a slice either way, so the same cache, reused
    eval_only = extract(features_config(tmp_path / "c", root, views=0, augment="none", pixels_on_device=True), QUIET)
    again = extract(features_config(tmp_path / "c", root, views=0, augment="none"), QUIET)
    assert again.reused and again.path == eval_only.path and not eval_only.reused


def test_unreadable_images_are_handled_as_the_loader_handles_them(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    (root / "class1" / "99.png").write_bytes(b"not a png")
    build_image_cache(ImageCacheConfig("imagefolder", root, resize=RESIZE, skip_bad=True), QUIET)
    with pytest.raises(MedfmError, match=r"cannot read image .*99\.png: unreadable when the image cache"):
        extract(features_config(tmp_path / "a", root, views=0, augment="none", pixels_on_device=True), QUIET)
    skipped = [extract(features_config(tmp_path / out, root, skip_bad=True, pixels_on_device=on), QUIET)
               for out, on in (("b", True), ("c", False))]
    with CacheReader(skipped[0].path) as a, CacheReader(skipped[1].path) as b:
        assert a.meta.skipped == b.meta.skipped == ("class1/99.png",)
        for group in a.groups:
            assert np.array_equal(a.valid(group), b.valid(group)) and np.array_equal(a.features(group), b.features(group))
    assert len(list((tmp_path / "b").rglob("*.skipped.tsv"))) == 1


def cli_args(out: Path, *extra: str) -> list[str]:
    return ["run", "--backbone", "tiny-deit", "--weights", "random", "--dataset", "demo", "--opt", "per_class=6", "--image-size",
            str(TINY_SIZE), "--batch-size", "4", "--out", str(out), "--pixels-on-device", *extra]


@pytest.mark.parametrize(("extra", "fragment"), [
    ([], "none matches these settings; build it first with `extract images --dataset demo --resize 37 --interpolation bicubic"),
    (["--image-cache", "off"], "--image-cache off reads none"),
    (["--corrupt", "gaussian_noise:3"], "--corrupt is not made on the device"),
])
def test_mistakes_are_one_line_and_write_nothing(extra: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = invoke(cli_args(tmp_path / "features", *extra), monkeypatch)
    assert fragment in error_line(code, err)
    assert not list(tmp_path.rglob("*.h5*"))


def test_pixels_that_do_not_fit_are_one_line_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_image_cache(ImageCacheConfig("demo", resize=RESIZE, interpolation="bicubic", dataset_options={"per_class": 6}, workers=0), QUIET)
    monkeypatch.setattr("extract.device_views.psutil.virtual_memory", lambda: SimpleNamespace(available=100_000))
    code, _, err = invoke(cli_args(tmp_path / "features"), monkeypatch)
    line = error_line(code, err)  # 24 images of 3 x 37 x 37 bytes: 96 KiB, over 75% of 100 kB
    assert line.startswith("error: --pixels-on-device: the images take") and "more than 75% of the" in line and "free on cpu" in line
    assert not (tmp_path / "features").exists()
