"""The image cache (`extract images`): the same tensors as the files, resumable, fingerprinted, bad images as extraction."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from cache.store import CacheReader, CacheWriter, partial_path, verify
from common.errors import MedfmError
from extract.cli import main
from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.image_cache import ImageCacheConfig, build_image_cache, find_image_cache
from extract.runner import extract
from extract.transforms import eval_transform, make_spec
from finetune.data import draw_epoch, find_pixels, make_loader
from finetune.distributed import World
from finetune.train import FinetuneConfig, finetune
from tests.extract.image_caches import RESIZE, features_config, photo_folder, spec, tensors
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT, run_main


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_tensors_from_the_image_cache_equal_those_from_the_files(tmp_path: Path, mode: str, channels: int) -> None:
    root = photo_folder(tmp_path / "data", mode=mode)
    build_image_cache(ImageCacheConfig("imagefolder", root, tmp_path / "images", resize=RESIZE, in_chans=channels), QUIET)
    source = get_dataset("imagefolder", root)
    pixels = find_image_cache(source, root, spec(channels), str(tmp_path / "images"))
    assert pixels is not None and not pixels.spec.jpeg_draft
    for train in (False, True):  # the eval view, and an augmented view drawn alike
        files, cached = tensors(source, spec(channels), train=train), tensors(source, spec(channels), pixels, train=train)
        assert len(files) == len(cached) == 12
        assert all(torch.equal(a, b) for a, b in zip(files, cached, strict=True))
    # a loader worker opens the file itself: the dataset pickles without an HDF5 handle and reads the same
    images = ImageDataset(source, "train", eval_transform(spec(channels)), (channels, TINY_SIZE, TINY_SIZE), pixels)
    images[0]
    copy = pickle.loads(pickle.dumps(images))
    assert copy.pixels._reader is None and torch.equal(copy[1][0], images[1][0])
    # another resize, interpolation or channel count is another image cache: not this one
    assert find_image_cache(source, root, spec(channels, "bicubic"), str(tmp_path / "images")) is None
    assert find_image_cache(source, root, spec(4 - channels), str(tmp_path / "images")) is None
    assert find_image_cache(source, root, spec(channels), "off") is None


def test_jpeg_draft_is_within_its_bound_and_opt_in(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data", suffix=".jpg", size=(400, 300))
    folder = tmp_path / "images"
    draft = build_image_cache(ImageCacheConfig("imagefolder", root, folder, resize=RESIZE, jpeg_draft=True), QUIET)
    source = get_dataset("imagefolder", root)
    assert find_image_cache(source, root, spec(), str(folder), draft=False) is None  # finetune: exact ones only
    pixels = find_image_cache(source, root, spec(), str(folder))
    assert pixels is not None and pixels.spec.jpeg_draft and pixels.path == draft.path
    to_pixels = make_spec(RESIZE, (0.0,) * 3, (1 / 255,) * 3, "bilinear")  # crop = resize: the stored 8-bit levels
    files, cached = tensors(source, to_pixels), tensors(source, to_pixels, pixels)
    diff = torch.stack([(a - b).abs() for a, b in zip(files, cached, strict=True)])
    assert 0 < diff.mean() < 2.0 and diff.max() <= 24  # not exact, close (measured: mean 1.1, max 13 levels; docs/images.md §4)


def test_a_killed_build_resumes_with_exactly_the_missing_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ImageCacheConfig("demo", out=tmp_path / "images", resize=RESIZE, dataset_options={"per_class": 10}, workers=0)
    whole = build_image_cache(ImageCacheConfig(**{**cfg.__dict__, "out": tmp_path / "whole"}), QUIET)
    write, calls = CacheWriter.write, []

    def dies_on_the_second_batch(self, split, start, features, valid=None):
        calls.append((split, start))
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill between two batches
        write(self, split, start, features, valid)

    monkeypatch.setattr(CacheWriter, "write", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(cfg, QUIET)
    monkeypatch.setattr(CacheWriter, "write", write)
    assert partial_path(whole.path.parent.parent / "images" / whole.path.name).exists()
    resumed = build_image_cache(cfg, QUIET)
    assert resumed.path.name == whole.path.name and not resumed.reused
    assert resumed.decoded == 40 - 16  # the first batch of 16 train rows was kept
    assert verify(resumed.path) == []
    with CacheReader(resumed.path) as a, CacheReader(whole.path) as b:
        for split in ("train", "val", "test"):
            assert np.array_equal(a.features(split, "pixels"), b.features(split, "pixels"))
            assert list(a.ids(split)) == list(b.ids(split)) and np.array_equal(a.labels(split), b.labels(split))
    assert build_image_cache(cfg, QUIET).reused


def test_the_fingerprint_changes_with_the_resize_spec(tmp_path: Path) -> None:
    base = dict(dataset="demo", out=tmp_path, dataset_options={"per_class": 5}, workers=0)
    paths = {build_image_cache(ImageCacheConfig(**base, **kw), QUIET).path
             for kw in ({"resize": RESIZE}, {"resize": RESIZE + 3}, {"resize": RESIZE, "interpolation": "bicubic"},
                        {"resize": RESIZE, "in_chans": 1}, {"resize": RESIZE, "jpeg_draft": True})}
    assert len(paths) == 5
    with CacheReader(build_image_cache(ImageCacheConfig(**base, resize=RESIZE + 3), QUIET).path) as reader:
        assert reader.features("train", "pixels").shape[1:] == (3, RESIZE + 3, RESIZE + 3)
        assert reader.meta.settings["resize"] == RESIZE + 3 and reader.meta.settings["interpolation"] == "bilinear"




def test_a_feature_cache_from_the_image_cache_equals_one_from_the_files(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    build_image_cache(ImageCacheConfig("imagefolder", root, resize=RESIZE), QUIET)  # $MEDFM_OUTPUT/images: found by auto
    cached = extract(features_config(tmp_path / "a", root), QUIET)
    files = extract(features_config(tmp_path / "b", root, image_cache="off"), QUIET)
    assert cached.path.name == files.path.name  # the same fingerprint: the same features
    with CacheReader(cached.path) as a, CacheReader(files.path) as b:
        assert a.groups == b.groups == ["train", "val", "test", "train+view0", "train+view1"]
        for group in a.groups:
            for name in ("pooled", "tokens"):
                assert np.array_equal(a.features(group, name), b.features(group, name)), (group, name)
    # a draft image cache alone: other pixels, so another feature cache, and its settings say why
    draft_folder = tmp_path / "draft"
    build_image_cache(ImageCacheConfig("imagefolder", root, draft_folder, resize=RESIZE, jpeg_draft=True), QUIET)
    draft = extract(features_config(tmp_path / "c", root, image_cache=str(draft_folder)), QUIET)
    assert draft.path.name != files.path.name
    with CacheReader(draft.path) as reader:
        assert reader.meta.settings["pixels"] == {"jpeg_draft": True}


def test_finetune_batches_from_the_image_cache_equal_those_from_the_files(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    build_image_cache(ImageCacheConfig("imagefolder", root, resize=RESIZE), QUIET)
    source, world = get_dataset("imagefolder", root), World(0, 1, torch.device("cpu"))
    pixels = find_pixels(source, root, spec(), "auto")
    assert pixels is not None
    batches = []
    for found in (None, pixels):
        loader, sampler = make_loader(source, "train", spec(), world, batch_size=2, train=True, augment=True, seed=0, workers=0,
                                      pixels=found)
        sampler.set_epoch(1)
        draw_epoch(loader, 0, 1)
        batches.append([images for images, *_ in loader])
    assert len(batches[0]) == 4 and all(torch.equal(a, b) for a, b in zip(*batches, strict=True))


def test_unreadable_images_are_handled_as_extraction_handles_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = photo_folder(tmp_path / "data")
    (root / "class1" / "99.png").write_bytes(b"not a png")
    code, _, err = run_main(main, ["images", "--dataset", "imagefolder", "--root", str(root), "--resize", str(RESIZE)], monkeypatch)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: cannot read image") and "99.png" in last and "--skip-bad" in last
    assert err.count("error:") == 1 and "Traceback" not in err
    code, out, _ = run_main(main, ["images", "--dataset", "imagefolder", "--root", str(root), "--resize", str(RESIZE), "--skip-bad"],
                            monkeypatch)
    assert code == 0 and "wrote" in out
    images = next((tmp_path / "outputs" / "images").glob("*.h5"))
    with CacheReader(images) as reader:
        assert reader.meta.skipped == ("class1/99.png",)
    with pytest.raises(MedfmError, match=r"cannot read image .*99\.png: unreadable when the image cache"):
        extract(features_config(tmp_path / "a", root, views=0, augment="none"), QUIET)
    skipped = [extract(features_config(tmp_path / out, root, views=0, augment="none", skip_bad=True, image_cache=image_cache), QUIET)
               for out, image_cache in (("b", "auto"), ("c", "off"))]
    with CacheReader(skipped[0].path) as a, CacheReader(skipped[1].path) as b:
        assert a.meta.skipped == b.meta.skipped == ("class1/99.png",)
        for split in a.splits:
            assert np.array_equal(a.valid(split), b.valid(split)) and np.array_equal(a.features(split), b.features(split))


def test_extract_images_command_writes_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["images", "--dataset", "demo", "--opt", "per_class=5", "--resize", str(RESIZE), "--workers", "0"]
    code, out, _ = run_main(main, args, monkeypatch)
    assert code == 0 and out.startswith("wrote") and len(list((tmp_path / "outputs" / "images").glob("demo-*.h5"))) == 1
    code, out, _ = run_main(main, args, monkeypatch)
    assert code == 0 and "reused" in out
    code, _, err = run_main(main, [*args, "--interpolation", "nearest"], monkeypatch)
    assert code == 2 and "--interpolation must be one of bilinear, bicubic" in err
    code, _, err = run_main(main, ["run", "--backbone", "deit", "--dataset", "demo", "--image-cache", str(tmp_path / "nowhere")],
                            monkeypatch)
    assert code == 2 and "--image-cache" in err and "neither auto, off nor a folder" in err


def test_a_grayscale_dataset_is_stored_in_one_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the dataset is: grey for the study's grayscale datasets (fed with --in-chans 1), a third of RGB's bytes."""
    root = photo_folder(tmp_path / "data", mode="L")
    as_grayscale = get_dataset
    monkeypatch.setattr("extract.image_cache.get_dataset", lambda *a, **kw: replace(as_grayscale(*a, **kw), grayscale=True))
    result = build_image_cache(ImageCacheConfig("imagefolder", root, tmp_path / "images", resize=RESIZE), QUIET)
    with CacheReader(result.path) as reader:
        assert reader.features("train", "pixels").shape[1:] == (1, RESIZE, RESIZE)
        assert reader.meta.settings["channels"] == 1


def test_finetune_reads_the_image_cache_and_trains_the_same_run(tmp_path: Path) -> None:
    build_image_cache(ImageCacheConfig("demo", resize=RESIZE, dataset_options={"per_class": 5}, workers=0), QUIET)
    base = FinetuneConfig(backbone="deit", dataset="demo", weights="random", image_size=TINY_SIZE, batch_size=4, epochs=1, workers=0,
                          warmup_steps=0, interpolation="bilinear", dataset_options={"per_class": 5}, overrides=TINY_VIT, device="cpu")
    said = io.StringIO()
    cached = finetune(replace(base, out=tmp_path / "a"), Console(file=said, width=300))
    files = finetune(replace(base, out=tmp_path / "b", image_cache="off"), QUIET)
    assert "reading the images from the image cache" in said.getvalue()
    assert cached.run_dir.name == files.run_dir.name  # the same run key: the option is not part of what is trained
    assert cached.history[0]["loss"] == files.history[0]["loss"] and cached.test_score == files.test_score


def test_an_image_is_transformed_on_one_thread_and_the_model_keeps_its_threads(tmp_path: Path) -> None:
    """Decoding in the main process does its per-image tensor work on one torch thread (the same tensors), then gives the
    model back its threads."""
    source = get_dataset("imagefolder", photo_folder(tmp_path / "data"))
    seen: list[int] = []

    def transform(image):
        seen.append(torch.get_num_threads())
        return eval_transform(spec())(image)

    images = ImageDataset(source, "train", transform, (3, TINY_SIZE, TINY_SIZE))
    one = images[0][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = images[0][0]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1] and torch.equal(one, two)
