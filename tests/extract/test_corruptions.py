"""Corrupted test views (docs/robustness.md §1): each kind corrupts, deterministically per seed; severity 0 is the clean
view; `--corrupt` mistakes are one line; the views are caches beside the clean one that are reused and resumed."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.cli import main as cache_main
from cache.store import CacheReader, partial_path, verify
from common.errors import MedfmError
from extract.corruptions import KINDS, Corruption, corrupt_image, parse_corruptions
from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract, group_images
from extract.transforms import eval_transform, make_spec
from tests.extract.extractions import error_line, invoke
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT_1, run_main

# the kinds that draw at random (the others are fixed filters): a different seed must give a different image
RANDOM_KINDS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow", "frost",
                "fog", "elastic_transform", "spatter")


def picture(mode: str = "RGB", side: int = 48) -> Image.Image:
    """A smooth image with edges and mid-range values, so blurs, noise and contrast changes all show."""
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([x * 4 + 30, y * 4 + 20, ((x // 8 + y // 8) % 2) * 120 + 60], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def test_the_kinds_are_the_librarys_own() -> None:
    from imagecorruptions import get_corruption_names  # numba and OpenCV: loaded by this test, not at collection

    assert KINDS == tuple(get_corruption_names("all"))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_the_image_and_is_deterministic_per_seed(kind: str) -> None:
    image = picture()
    first, again = (corrupt_image(image, Corruption(kind, 3), seed=7) for _ in range(2))
    assert first.size == image.size and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(image))
    if kind in RANDOM_KINDS:
        other = corrupt_image(image, Corruption(kind, 3), seed=8)
        assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_a_gray_image_is_corrupted_as_gray() -> None:
    image = picture("L")
    out = corrupt_image(image, Corruption("gaussian_noise", 2), seed=1)
    assert out.mode == "L" and out.size == image.size and not np.array_equal(np.asarray(out), np.asarray(image))


def test_the_global_numpy_stream_is_left_as_it_was() -> None:
    np.random.seed(3)
    want = np.random.rand(4)
    np.random.seed(3)
    corrupt_image(picture(), Corruption("snow", 2), seed=11)
    assert np.array_equal(np.random.rand(4), want)


@pytest.mark.parametrize("clean", [Corruption("gaussian_noise", 0), Corruption("none", 0), Corruption("none", 3)])
def test_severity_0_or_none_is_the_clean_eval_transform(clean: Corruption) -> None:
    spec = make_spec(TINY_SIZE, (0.5,) * 3, (0.25,) * 3, "bicubic")
    image = picture(side=60)
    assert clean.clean and corrupt_image(image, clean, seed=1) is image
    torch.manual_seed(0)
    assert torch.equal(eval_transform(spec, clean)(image), eval_transform(spec)(image))
    assert not torch.equal(eval_transform(spec, Corruption("gaussian_noise", 3))(image), eval_transform(spec)(image))


def test_an_image_is_corrupted_alike_in_any_order_and_process_from_its_id_and_the_seed() -> None:
    source = get_dataset("demo", None, per_class=6)
    spec = make_spec(TINY_SIZE, (0.5,) * 3, (0.25,) * 3, "bicubic")
    images = group_images(source, "test", spec, None, 0, Corruption("gaussian_noise", 3, seed=0))
    items = [images[i] for i in range(len(images))]
    assert all(ok for _, ok, _ in items)  # a failed corruption would come back as a flagged zero image
    forward = [image for image, _, _ in items]
    backward = [images[i][0] for i in reversed(range(len(images)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    reseeded = group_images(source, "test", spec, None, 0, Corruption("gaussian_noise", 3, seed=1))
    clean = group_images(source, "test", spec, None, 0)
    assert not torch.equal(forward[0], reseeded[0][0]) and not torch.equal(forward[0], clean[0][0])


def test_parsing_expands_all_keeps_order_and_drops_repeats() -> None:
    got = parse_corruptions(" fog:2, all:1 ,fog:2,none,contrast:0", seed=5)
    assert got[0] == Corruption("fog", 2, 5) and got[1:20] == tuple(Corruption(k, 1, 5) for k in KINDS)
    assert got[20:] == (Corruption("none", 0, 5), Corruption("contrast", 0, 5)) and all(c.clean for c in got[20:])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("blur:3", "unknown corruption 'blur'; choose one of: gaussian_noise"),
        ("fog:6", "--corrupt fog:6: the severity must be a whole number from 0 (the clean view) to 5, got '6'"),
        ("fog:-1", "got '-1'"),
        ("fog:x", "got 'x'"),
        ("fog", "--corrupt takes KIND:SEVERITY[,KIND:SEVERITY...]"),
        ("fog:2,,snow:1", "got ''"),
    ],
)
def test_a_bad_corruption_is_one_line_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(MedfmError, match="^[^\n]+$") as caught:
        parse_corruptions(text)
    assert fragment in str(caught.value)


def cli_args(out: Path, corrupt: str, *extra: str) -> list[str]:
    return ["run", "--backbone", "tiny-deit", "--weights", "random", "--dataset", "demo", "--opt", "per_class=6", "--image-size",
            str(TINY_SIZE), "--workers", "0", "--batch-size", "4", "--out", str(out), "--corrupt", corrupt, *extra]


@pytest.mark.parametrize(
    ("corrupt", "extra", "fragment"),
    [
        ("snowy:3", [], "unknown corruption 'snowy'"),
        ("snow:9", [], "the severity must be a whole number from 0"),
        ("snow3", [], "--corrupt takes KIND:SEVERITY"),
        ("snow:3", ["--image-size", "16"], "--corrupt needs images of at least 32 pixels after the resize, these are 18"),
    ],
)
def test_cli_corrupt_mistakes_are_one_line_exit_2_and_no_file(corrupt: str, extra: list[str], fragment: str, tmp_path: Path,
                                                             monkeypatch) -> None:
    code, _, err = invoke(cli_args(tmp_path, corrupt, *extra), monkeypatch)
    assert fragment in error_line(code, err)
    assert not list(tmp_path.rglob("*.h5*"))


def test_cli_writes_a_test_only_cache_per_corruption_beside_the_clean_one_and_reuses_them(tmp_path: Path, monkeypatch) -> None:
    code, out, err = invoke(cli_args(tmp_path, "gaussian_noise:3,pixelate:0,none"), monkeypatch)
    assert code == 0, err
    (clean,) = tmp_path.rglob("demo-????????????.h5")
    assert sorted(p.name for p in tmp_path.rglob("*.h5")) == sorted([clean.name, f"{clean.stem}+gaussian_noise-3.h5"])
    view = clean.with_name(f"{clean.stem}+gaussian_noise-3.h5")
    with CacheReader(clean) as c, CacheReader(view) as v:
        assert v.groups == ["test"] and v.meta.views == 0
        assert v.ids("test").tolist() == c.ids("test").tolist() and np.array_equal(v.labels("test"), c.labels("test"))
        assert v.features("test").shape == c.features("test").shape
        assert not np.allclose(v.features("test"), c.features("test"))
        assert v.meta.corruption == {"kind": "gaussian_noise", "severity": 3, "seed": 0} and c.meta.corruption == {}
        assert v.meta.settings == {**c.meta.settings, "corrupt": v.meta.corruption}
    assert verify(view) == [] and f"wrote {view}" in out.replace("\n", "")
    stamp = view.stat().st_mtime_ns
    code, out, err = invoke(cli_args(tmp_path, "gaussian_noise:3"), monkeypatch)
    assert code == 0 and f"reused {view}" in out.replace("\n", "") and view.stat().st_mtime_ns == stamp, err
    code, _, err = invoke(cli_args(tmp_path, "gaussian_noise:3", "--corrupt-seed", "1"), monkeypatch)
    assert "was corrupted with --corrupt-seed 0; remove it with `cache rm" in error_line(code, err)
    monkeypatch.setenv("COLUMNS", "300")
    code, listing, err = run_main(cache_main, ["ls", str(tmp_path)], monkeypatch)
    rows = {Path(re.search(r"\S*demo-\S+\.h5", line).group()).name: line.strip() for line in listing.splitlines() if "demo-" in line}
    assert code == 0 and set(rows) == {clean.name, view.name}, err
    assert rows[view.name].endswith("bicubic, corrupt gaussian_noise-3") and rows[clean.name].endswith("bicubic")
    assert " 0/0/5 " in rows[view.name] and "/5 " in rows[clean.name]  # train, val, test rows


def test_an_interrupted_corrupted_view_resumes_from_its_partial_file(tmp_path: Path, monkeypatch) -> None:
    def config(out: Path) -> ExtractConfig:
        return ExtractConfig(backbone="deit", dataset="demo", weights="random", out=out, batch_size=2, image_size=TINY_SIZE,
                             workers=0, overrides=TINY_VIT_1, dataset_options={"per_class": 6},
                             corrupt=parse_corruptions("motion_blur:2"))

    calls = []

    def interrupted(image: Image.Image, corruption: Corruption, seed: int) -> Image.Image:
        calls.append(seed)
        if len(calls) == 4:  # the second batch of the corrupted test split: the first is written
            raise KeyboardInterrupt
        return corrupt_image(image, corruption, seed)

    monkeypatch.setattr("extract.transforms.corrupt_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(config(tmp_path / "killed"), QUIET)
    monkeypatch.undo()
    (partial,) = (tmp_path / "killed").rglob("*+motion_blur-2.h5.partial")
    resumed = extract(config(tmp_path / "killed"), QUIET)
    whole = extract(config(tmp_path / "whole"), QUIET)
    (view,), (want,) = resumed.corrupted, whole.corrupted
    assert resumed.reused and not view.reused and view.path.name == partial.name.removesuffix(".partial")
    assert not partial_path(view.path).exists() and view.extracted == want.extracted - 2
    assert whole.build_s > 0 and resumed.build_s > 0 and want.build_s == view.build_s == 0  # one model, its build counted once
    with CacheReader(view.path) as got, CacheReader(want.path) as ref:
        assert got.ids("test").tolist() == ref.ids("test").tolist()
        np.testing.assert_array_equal(got.features("test"), ref.features("test"))
