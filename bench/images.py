"""Benchmark 8: the image cache ("decode once", `extract images`) against decoding the original files.

On images the size of the study's (APTOS fundus PNGs, ~2000 x 1500; ISIC dermoscopy JPEGs, ~1000 x 750), generated
here with photographic noise so that they compress and decode like photographs:
- decode rate: each file decoded, resized to 256 px and put through the study's eval transform / the same images read
  from the image cache, per format, on one torch thread as a loader worker runs them; and JPEG draft mode's decode
  rate over the full decode's, with its pixel error (the draft image cache against the exact one);
- extraction from the image cache / the bare forward (DeiT-S shape, 224 px, the JPEGs' eval view, the runner's
  default workers): the extraction loop's own rate (first batch to last row written, `ExtractResult.images_per_s`) over
  the model's on the same batches;
- decode-bound speedups on the APTOS-sized PNGs with a tiny ViT (the model costs next to nothing, as on a GPU): the
  extraction loop's rate, and one finetune train epoch (the study's augmentation, forward, backward), from the files
  and from the image cache.

The decode-bound runs decode (or read) in one loader worker while the main process runs the model on one torch thread,
as a GPU run splits them (on 2 cores, a model on 2 threads would stall whenever the worker holds a core).
`--smoke`: 20 small images per format (two distinct), 32 px inputs, one-block ViTs, one round.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from bench.common import SMOKE_IMAGE_SIZE, SMOKE_VIT, at_least, device, fastest_rounds, record, run_bench, sync
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource
from extract.datasets.images import ImageDataset
from extract.image_cache import CachedPixels, ImageCacheConfig, JpegDraft, build_image_cache, find_image_cache
from extract.runner import CPU_BATCH, BackboneForward, ExtractConfig, autocast_dtype, extract
from extract.transforms import Normalize, TransformSpec, eval_transform, make_spec
from finetune.data import make_loader
from finetune.distributed import World


@dataclass(frozen=True)
class Sizes:
    aptos: tuple[int, int]  # PNG width x height
    isic: tuple[int, int]  # JPEG width x height
    pngs: int  # images per format, two classes
    jpegs: int
    distinct: int  # images generated per format; the others are copies (decoded all the same)
    image_size: int
    vit: tuple[str, dict[str, Any]]
    tiny: tuple[str, dict[str, Any]]  # decode-bound: the model is almost free
    rounds: int


FULL = Sizes((2000, 1500), (1000, 750), 48, 96, 12,
             224,  # the study's input: resize 256, crop 224
             ("deit", {"embed_dim": 384, "depth": 12, "num_heads": 6}),  # DeiT-S shape
             ("deit", {"embed_dim": 32, "depth": 1, "num_heads": 2}), 3)
SMOKE = Sizes((160, 120), (120, 90), 20, 20, 2, SMOKE_IMAGE_SIZE, ("deit", SMOKE_VIT), ("deit", SMOKE_VIT), 1)
TARGET = 0.9
WORKERS = 1  # decode-bound runs: one loader process decodes, the main one runs the model
QUIET = Console(quiet=True)


def photo(rng: np.random.Generator, size: tuple[int, int], fundus: bool) -> Image.Image:
    """A bright disc on black (fundus) or a dark blob on skin (dermoscopy), with smooth shading and sensor noise."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx = height * rng.uniform(0.45, 0.55), width * rng.uniform(0.45, 0.55)
    r = np.hypot(yy - cy, xx - cx) / (0.45 * min(width, height))
    shade = 0.5 + 0.5 * np.sin(xx / width * rng.uniform(3, 6) + yy / height * rng.uniform(2, 5))
    if fundus:
        base = np.clip(1.1 - r, 0, 1)[..., None] * np.array([0.9, 0.45, 0.2], dtype=np.float32) * (0.7 + 0.3 * shade[..., None])
        base[r > 1] = 0
    else:
        blob = np.exp(-(r * rng.uniform(1.5, 2.5)) ** 2)[..., None]
        skin = np.array([0.85, 0.65, 0.55], dtype=np.float32) * (0.8 + 0.2 * shade[..., None])
        base = skin * (1 - blob) + np.array([0.35, 0.2, 0.15], dtype=np.float32) * blob
    noisy = base * 255 + rng.normal(0, 3, base.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_images(root: Path, count: int, size: tuple[int, int], suffix: str, distinct: int) -> Path:
    """An imagefolder tree of `count` photographs in two classes: `distinct` generated ones, the rest copies of them."""
    rng = np.random.default_rng(0)
    paths = [root / f"class{i % 2}" / f"{i:03d}{suffix}" for i in range(count)]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        if i < distinct:
            photo(rng, size, fundus=suffix == ".png").save(path, **({"quality": 90} if suffix == ".jpg" else {}))
        else:
            shutil.copyfile(paths[i % distinct], path)
    return root


def all_images(source: DatasetSource, tspec: TransformSpec, pixels: CachedPixels | None = None) -> list[ImageDataset]:
    return [ImageDataset(source, split, eval_transform(tspec), (3, tspec.size, tspec.size), pixels) for split in source.splits]


def read_every(datasets: list[ImageDataset]) -> None:
    """Every image of `datasets`, on one torch thread as in a loader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for data in datasets:
            for i in range(len(data)):
                data[i]
    finally:
        torch.set_num_threads(threads)


def decode_rates(root: Path, tspec: TransformSpec, images_dir: Path, rounds: int) -> dict[str, float]:
    """Seconds of reading every image from its file, from the exact image cache, and (JPEG) by draft decoding; its pixel error."""
    source = get_dataset("imagefolder", root)
    exact = build_image_cache(ImageCacheConfig("imagefolder", root, images_dir), QUIET)
    pixels = find_image_cache(source, root, tspec, str(images_dir), draft=False)
    jpeg = next(root.rglob("*.jpg"), None) is not None
    readers = {"files": all_images(source, tspec), "cache": all_images(source, tspec, pixels)}
    if jpeg:
        readers["draft"] = all_images(replace(source, load_image=JpegDraft(source.load_image, tspec.resize)), tspec)
    best = fastest_rounds({name: lambda images=images: read_every(images) for name, images in readers.items()}, rounds)
    out = {"images": sum(len(split) for split in source.splits.values()), **{f"{name}_s": seconds for name, seconds in best.items()}}
    if jpeg:
        draft = build_image_cache(ImageCacheConfig("imagefolder", root, images_dir, jpeg_draft=True), QUIET)
        differences = [pixel_difference(exact.path, draft.path, split) for split in source.splits]
        out |= {"draft_max_abs": max(d[0] for d in differences), "draft_mean_abs": float(np.mean([d[1] for d in differences]))}
    return out


def pixel_difference(exact: Path, draft: Path, split: str) -> tuple[int, float]:
    """Max and mean absolute difference, in 8-bit levels, of two image caches' pixels of `split`."""
    from cache.store import CacheReader

    with CacheReader(exact) as a, CacheReader(draft) as b:
        diff = np.abs(a.features(split, "pixels").astype(np.int16) - b.features(split, "pixels").astype(np.int16))
    return int(diff.max()), float(diff.mean())


def extraction_over_bare(root: Path, images_dir: Path, dev: torch.device, s: Sizes) -> dict[str, float]:
    """The extraction loop's rate reading the image cache over the bare forward's, on the loop's batches (splits apart)."""
    backbone, overrides = s.vit
    cfg = ExtractConfig(backbone=backbone, dataset="imagefolder", root=root, weights="random", image_size=s.image_size, device=str(dev),
                        interpolation="bilinear", image_cache=str(images_dir), overrides=overrides, batch_size=CPU_BATCH)
    model = create_backbone(backbone, "random", image_size=s.image_size, **overrides)
    forward = BackboneForward(model, [model.num_layers - 1], dev, autocast_dtype(cfg.precision, dev))
    source = get_dataset("imagefolder", root)
    rows = sum(len(split) for split in source.splits.values())
    inputs = [x for split in source.splits.values() for x in torch.randn(len(split), 3, s.image_size, s.image_size).to(dev).split(CPU_BATCH)]
    rates: list[float] = []

    def pipeline() -> None:
        out = Path(tempfile.mkdtemp(dir=images_dir.parent))
        cfg.out = out
        rates.append(extract(cfg, QUIET).images_per_s or 0.0)
        shutil.rmtree(out)

    def bare() -> None:
        for x in inputs:
            forward(x)
        sync(dev)

    bare()  # warm-up
    best = fastest_rounds({"pipeline": pipeline, "bare": bare}, s.rounds)
    return {"rows": rows, "bare_img_s": rows / best["bare"], "loop_img_s": max(rates)}


def decode_bound(root: Path, images_dir: Path, dev: torch.device, s: Sizes) -> dict[str, float]:
    """The extraction loop's rate and the seconds of one finetune train epoch (tiny ViT), from the files and from the image cache."""
    backbone, overrides = s.tiny
    model = create_backbone(backbone, "random", image_size=s.image_size, **overrides).to(dev)
    head = torch.nn.Linear(model.pooled_dim, 2).to(dev)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()])
    source = get_dataset("imagefolder", root)
    dc = model.data_config
    tspec = make_spec(s.image_size, dc.mean, dc.std, "bilinear")
    world = World(0, 1, dev)

    rates: dict[str, float] = {"off": 0.0, str(images_dir): 0.0}

    def extraction(image_cache: str) -> None:
        out = Path(tempfile.mkdtemp(dir=images_dir.parent))
        result = extract(ExtractConfig(backbone=backbone, dataset="imagefolder", root=root, weights="random", out=out, device=str(dev),
                                       image_size=s.image_size, interpolation="bilinear", image_cache=image_cache, overrides=overrides,
                                       workers=WORKERS), QUIET)
        rates[image_cache] = max(rates[image_cache], result.images_per_s or 0.0)
        shutil.rmtree(out)

    normalize = Normalize(tspec)  # the loader hands over uint8 crops, as finetune's training loop gets them

    def epoch(pixels: CachedPixels | None) -> None:
        loader, _ = make_loader(source, "train", tspec, world, batch_size=4, train=True, augment=True, seed=0, workers=WORKERS,
                                pixels=pixels)
        for images, labels, *_ in loader:
            loss = torch.nn.functional.cross_entropy(head(model(normalize(images.to(dev))).pooled), labels.to(dev))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(dev)

    pixels = find_image_cache(source, root, tspec, str(images_dir), draft=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model on one core, the loader worker on the other: neither waits for the other's core
    try:
        best = fastest_rounds({"extract_files": lambda: extraction("off"), "extract_cache": lambda: extraction(str(images_dir)),
                               "epoch_files": lambda: epoch(None), "epoch_cache": lambda: epoch(pixels)}, s.rounds)
    finally:
        torch.set_num_threads(threads)
    return {"extract_files_img_s": rates["off"], "extract_cache_img_s": rates[str(images_dir)],
            "epoch_files_s": best["epoch_files"], "epoch_cache_s": best["epoch_cache"]}


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    dev = device()
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-images-"))
    try:
        pngs = write_images(work / "aptos", s.pngs, s.aptos, ".png", s.distinct)
        jpegs = write_images(work / "isic", s.jpegs, s.isic, ".jpg", s.distinct)
        tspec = make_spec(s.image_size, (0.5,) * 3, (0.25,) * 3, "bilinear")
        png, jpeg = decode_rates(pngs, tspec, work / "images", s.rounds), decode_rates(jpegs, tspec, work / "images", s.rounds)
        loop = extraction_over_bare(jpegs, work / "images", dev, s)
        bound = decode_bound(pngs, work / "images", dev, s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {
        "png_cache_read_over_decode": png["files_s"] / png["cache_s"],
        "jpeg_cache_read_over_decode": jpeg["files_s"] / jpeg["cache_s"],
        "jpeg_draft_decode_over_full": jpeg["files_s"] / jpeg["draft_s"],
        "extraction_from_cache_over_bare": loop["loop_img_s"] / loop["bare_img_s"],
        "png_extraction_cache_over_files": bound["extract_cache_img_s"] / bound["extract_files_img_s"],
        "png_finetune_epoch_files_over_cache": bound["epoch_files_s"] / bound["epoch_cache_s"],
    }
    details = {
        "png": {"size": s.aptos, "images": png["images"], "decode_img_s": png["images"] / png["files_s"],
                "cache_img_s": png["images"] / png["cache_s"]},
        "jpeg": {"size": s.isic, "images": jpeg["images"], "decode_img_s": jpeg["images"] / jpeg["files_s"],
                 "cache_img_s": jpeg["images"] / jpeg["cache_s"], "draft_max_abs": jpeg["draft_max_abs"],
                 "draft_mean_abs": round(jpeg["draft_mean_abs"], 3)},
        "extraction": {"model": f"{s.vit[0]} {s.vit[1]}", "images": "jpeg", **{k: round(v, 2) for k, v in loop.items()}},
        "decode_bound": {"model": f"{s.tiny[0]} {s.tiny[1]}", "images": "png", "workers": WORKERS,
                         **{k: round(v, 3) for k, v in bound.items()}},
        "resize": tspec.resize, "interpolation": "bilinear", "rounds": s.rounds,
    }
    return record("images", ratios, {"extraction_from_cache_over_bare": at_least(TARGET)}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
