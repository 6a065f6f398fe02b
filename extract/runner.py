"""The extraction loop: loader -> model -> bounded writer queue -> cache.

Read `extract` top to bottom: resolve settings and the fingerprint, reuse a complete cache when the
fingerprint matches, else open (or resume) the partial file and stream every split through the model
while a writer thread flushes finished batches to disk.

Under `torchrun --nproc_per_node N -m extract run ...` each process extracts one contiguous block of
every split into its own shard file on its own GPU, and rank 0 joins the shards into the one cache.
The processes never talk to each other: a shard is done when its file is complete, so a rank that
finishes early waits on no collective and a rerun resumes every shard where it stopped.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cache.fingerprint import fingerprint, manifest_hash
from cache.layout import cache_path
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, feature_key, view_group
from cache.store import (
    CacheReader,
    CacheWriter,
    FeatureSpec,
    SplitPlan,
    join_shards,
    partial_path,
    planned_bytes,
    scale_key,
    shard_path,
)
from common.errors import MedfmError
from common.precision import autocast_dtype, for_protocol
from common.progress import Pace
from common.runtime import (
    check_folder,
    check_workers,
    device_label,
    loader_workers,
    output_root,
    rank_device,
    resolve_device,
    torchrun_launch,
)
from extract.backbones import Backbone, Features, create_backbone, get_spec
from extract.backbones.weights import resolve_weights
from extract.corruptions import CORRUPT_VIEW, MIN_SIDE, Corruption
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource, Split
from extract.datasets.decode import DECODER_VERSION
from extract.datasets.images import ImageDataset, SkippedImages
from extract.datasets.splits import read_manifest
from extract.device_views import DeviceViews, check_fits, held_bytes
from extract.image_cache import CachedPixels, find_image_cache, image_folder, pixel_spec, rebuild_command
from extract.inputs import check_image_size, check_input_settings, check_study_inputs, check_views, input_spec
from extract.transforms import CROP_FRACTION, Normalize, TransformSpec, eval_crop, train_crop, view_seed

TOKEN_DTYPES = ("float16", "float32", "int8")  # int8: one float32 scale per token (`quantize`), about half of float16's bytes
INT8_LEVELS = 127  # symmetric: -127..127, so a value and its negation quantize alike
PREFETCH_BATCHES = 4  # per worker: enough to ride out a slow image, bounded so memory stays flat
CPU_BATCH = 16  # what --batch-size auto means on the CPU
AUTO_BATCH_CAP = 256  # beyond this a GPU's throughput no longer grows, only the memory held


@dataclass
class ExtractConfig:
    backbone: str
    dataset: str
    root: Path | None = None
    weights: str = "default"  # default | random | auto (default, else random with a warning) | PATH
    out: Path = field(default_factory=lambda: output_root() / "features")
    batch_size: int | str = "auto"  # auto: the largest power of two up to 256 that fits on CUDA; 16 on the CPU
    tokens: bool = True
    token_dtype: str = "float16"
    layers: Sequence[int] | None = (-1,)  # None: every block
    image_size: int | None = None
    in_chans: int = 3  # 1: grayscale input, first conv rebuilt from the pretrained R-channel kernel (the study's recipe)
    norm: str = "model"  # model: the backbone's own mean/std | dataset: the train split's | study: the study's constants
    interpolation: str = "model"  # resize mode: model (the backbone's) | bilinear (the study's) | bicubic
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    compile: bool = False  # torch.compile the backbone: slower start, faster steady state on long runs
    compile_backend: str = "inductor"  # torch.compile's backend with `compile` (the benchmarks' CPU smoke runs: eager)
    skip_bad: bool = False
    views: int = 0  # augmented train views stored beside the eval view (docs/protocol.md §4): the study's frozen protocol
    augment: str = "none"  # the augmentation the views are drawn with: none | study
    augment_seed: int = 0  # image i of view v is drawn from view_seed(augment_seed, v, id); finetune's epoch v from its --seed
    protocol: str = "medfm"  # medfm | study: the official code's backbone rules where they differ (docs/protocol.md §7)
    manifest: Path | None = None  # a saved <cache>.splits.json: reproduce that split instead of the dataset's own
    dataset_options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone constructor overrides (tests, tiny models)
    corrupt: Sequence[Corruption] = ()  # corrupted test views, each its own cache beside the clean one (docs/robustness.md §1)
    image_cache: str = "auto"  # auto: read images from a matching `extract images` cache under $MEDFM_OUTPUT/images | off | DIR
    pixels_on_device: bool = False  # hold the image cache on the device and cut the views there (extract/device_views.py)


@dataclass
class ExtractResult:
    path: Path
    reused: bool
    rows: dict[str, int]
    images_per_s: float | None
    random_weights: bool
    extracted: int = 0  # images run through the model by this call (a resumed run: only the rows still missing)
    build_s: float = 0.0  # seconds spent building the model and loading its weights (anyone running the model pays them)
    corrupted: list[ExtractResult] = field(default_factory=list)  # the corrupted test views' caches (`--corrupt`), clean ones left out


def feature_plan(model: Backbone, layers: Sequence[int], tokens: bool, token_dtype: str, device: torch.device) -> dict[str, FeatureSpec]:
    """Names and shapes of the stored arrays, from one forward pass on zeros."""
    size = model.data_config.input_size
    with torch.inference_mode():
        feats = model.forward_layers(torch.zeros(1, model.in_chans, size, size, device=device), layers)
    plan: dict[str, FeatureSpec] = {}
    for index, f in feats.items():
        plan[feature_key("pooled", index, model.num_layers)] = FeatureSpec(tuple(f.pooled.shape[1:]), "float32")
        if tokens:
            key = feature_key("tokens", index, model.num_layers)
            plan[key] = FeatureSpec(tuple(f.tokens.shape[1:]), token_dtype)
            if token_dtype == "int8":
                plan[scale_key(key)] = FeatureSpec(tuple(f.tokens.shape[1:-1]), "float32")
    return plan


def quantize(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [..., D] as int8 and one float32 scale per token [...]: round(x / s) with s = max |x| / 127 of the token,
    so each value is off by at most s / 2. An all-zero token gets scale 1 (its values are 0 either way).

    Per token rather than per channel (bench/tokens.py measures both): the scales cost 2 / D of float16's bytes,
    under 1% for the study's backbones, where per-channel scales cost 2 / T, which grows as the token grid shrinks
    (16 tokens: 0.625 of float16 in all; a CNN's 7 x 7 grid: 0.54). On a small random ViT per-channel
    scales gave less error (0.40% against 0.67% RMS) and neither changed a DeiT head's test predictions."""
    x = tokens.float()
    scales = x.abs().amax(dim=-1) / INT8_LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return (x / scales[..., None]).round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scales


def uses_channels_last(model: nn.Module) -> bool:
    """CNNs (most weights in 2-D convolutions) run faster channels-last (cuDNN and oneDNN NHWC kernels); ViTs do not care."""
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    return conv > 0.5 * sum(p.numel() for p in model.parameters())


class BackboneForward:
    """The backbone as extraction runs it: on its device, channels-last when a CNN, autocast, no autograd.

    With `normalize`, uint8 batches (the loader's crops, `extract.transforms.eval_crop`) are normalised on the device;
    float batches go in as they are. The benchmark's bare forward uses this same object, so the two differ only by the
    pipeline around it.
    """

    def __init__(self, model: Backbone, layers: Sequence[int], device: torch.device, amp: torch.dtype | None,
                 normalize: Normalize | None = None) -> None:
        self.memory_format = torch.channels_last if uses_channels_last(model) else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).eval()
        self.layers, self.device, self.amp, self.normalize = list(layers), device, amp, normalize
        self._forward_layers = self.model.forward_layers

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile the forward (the first batches pay the compilation)."""
        self._forward_layers = torch.compile(self.model.forward_layers, backend=backend)

    def __call__(self, images: torch.Tensor) -> dict[int, Features]:
        # move first (an asynchronous copy from pinned memory), then change the layout and normalise uint8 on the device:
        # laid out while still uint8, a quarter of the bytes move, and the float operations keep the layout
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if images.dtype == torch.uint8:
            if self.normalize is None:
                raise ValueError("uint8 images need the BackboneForward's normalize (extract.transforms.Normalize)")
            images = self.normalize(images).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self._forward_layers(images, self.layers)

    def auto_batch_size(self, shape: tuple[int, int, int]) -> int:
        """On CUDA, the largest power of two up to AUTO_BATCH_CAP whose forward leaves half the free memory
        for prefetched batches and outputs in flight; CPU_BATCH on the CPU, where larger batches gain nothing."""
        if self.device.type != "cuda":
            return CPU_BATCH
        free, _ = torch.cuda.mem_get_info(self.device)
        size = AUTO_BATCH_CAP
        while size > 1:
            try:
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                self(torch.zeros(size, *shape, device=self.device))
                torch.cuda.synchronize(self.device)
                if torch.cuda.max_memory_allocated(self.device) - before < free / 2:
                    return size
            except torch.cuda.OutOfMemoryError:
                pass
            torch.cuda.empty_cache()
            size //= 2
        return 1


def extract(cfg: ExtractConfig, console: Console | None = None, source: DatasetSource | None = None) -> ExtractResult:
    """Extract features of every split of `cfg.dataset` with `cfg.backbone` into a fingerprinted cache; `source` is the
    dataset already read with `cfg`'s root and options (the command line reads it first, to say a layout's mistakes
    before torch loads), else it is read here."""
    launch = torchrun_launch()
    console = console or Console(stderr=True, quiet=not launch.is_main)  # one progress bar: rank 0's
    check_input_settings(cfg.norm, cfg.in_chans, cfg.image_size, cfg.interpolation)
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise MedfmError(f"--batch-size must be auto or at least 1, got {cfg.batch_size}")
    if cfg.token_dtype not in TOKEN_DTYPES:
        raise MedfmError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {cfg.token_dtype}")
    check_workers(cfg.workers)
    check_folder(cfg.out, "--out", writable=False)  # a complete cache on a read-only disk is still reused
    check_views(cfg.views, cfg.augment)
    image_folder(cfg.image_cache)  # a mistyped --image-cache is one line before the model loads
    check_pixels_on_device(cfg)
    device = rank_device(resolve_device(cfg.device), launch)
    amp = autocast_dtype(for_protocol(cfg.precision, cfg.protocol, device), device)

    # --- settings -> fingerprint -> the clean cache, then each corrupted test view's (planned first: a mistake stops before any work)
    planned = plan_cache(cfg, device, amp, console, source)
    if cfg.pixels_on_device and planned.pixels is None and not planned.path.exists():
        raise MedfmError(f"--pixels-on-device reads the images from an image cache, and none matches these settings; build it "
                         f"first with `{image_cache_command(planned, cfg)}`")
    corrupted = [corrupted_plan(planned, corruption) for corruption in cfg.corrupt if not corruption.clean]
    result = write_cache(planned, cfg, device, amp, console)
    result.corrupted = [write_cache(view, replace(cfg, views=0, augment="none"), device, amp, console) for view in corrupted]
    return result


def check_pixels_on_device(cfg: ExtractConfig) -> None:
    """`--pixels-on-device` needs an image cache to hold, and makes the clean views only: one line each, before the model loads."""
    if not cfg.pixels_on_device:
        return
    if cfg.image_cache == "off":
        raise MedfmError("--pixels-on-device holds the image cache's pixels on the device, and --image-cache off reads none: "
                         "pass --image-cache auto (or the folder of `extract images`), or leave out --pixels-on-device")
    if cfg.corrupt:
        raise MedfmError("--corrupt is not made on the device (each corruption runs on the PIL image): extract the corrupted "
                         "test views without --pixels-on-device")


def image_cache_command(planned: PlannedCache, cfg: ExtractConfig) -> str:
    """The `extract images` command that builds the image cache `planned` would read."""
    tspec = planned.tspec
    spec = pixel_spec(tspec.resize, tspec.interpolation, tspec.channels)
    folder = image_folder(cfg.image_cache)
    return rebuild_command(planned.source, cfg.root, folder, spec, cfg.manifest).removesuffix(" --rebuild")


def write_cache(planned: PlannedCache, cfg: ExtractConfig, device: torch.device, amp: torch.dtype | None, console: Console) -> ExtractResult:
    """Reuse the complete cache `planned` names, or write it (resuming a partial file): every group through the model."""
    launch = torchrun_launch()
    source, weights, model, tspec, layers, path = (planned.source, planned.weights, planned.model, planned.tspec, planned.layers,
                                                   planned.path)
    manifest = planned.manifest
    manifest_file = path.with_suffix(".splits.json")
    if path.exists():
        return _reuse(planned, console)

    # --- plan -> writer (resumes a partial file with the same fingerprint)
    features = feature_plan(model, layers, cfg.tokens, cfg.token_dtype, device)
    meta = _cache_meta(planned, cfg)
    # every group the cache holds: the splits, then each augmented train view (same images, its own draws)
    views = {view_group(v): v for v in range(cfg.views)}
    if views and "train" not in source.splits:
        raise MedfmError(f"--views needs a train split; {source.name} has {', '.join(source.splits)}")
    source = replace(source, splits={**source.splits, **dict.fromkeys(views, source.splits.get("train"))})
    plan = split_plans(source, features)  # the whole cache's groups: what it will hold, and its size
    # this process's part: the whole cache, or under torchrun its shard (a contiguous block of every group)
    part, target = source, path
    if launch.size > 1:
        part, target = source_block(source, launch.rank, launch.size), shard_path(path, launch.rank, launch.size)
    if cfg.pixels_on_device and not target.exists():  # before anything is written
        check_fits(held_bytes(planned.pixels, part), device)
    if launch.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest_file.write_text(json.dumps(manifest))
    rate, extracted = None, 0
    if not target.exists():  # a shard finished before an interruption is kept
        resuming = partial_path(target).exists()
        part_plan = plan if part is source else split_plans(part, features)
        writer = CacheWriter.open(target, meta, part_plan)
        done = {s: writer.rows(s) for s in part_plan}
        if resuming and any(done.values()):
            console.print(f"resuming {partial_path(target).name}: " + ", ".join(f"{s} {done[s]}/{writer.planned(s)}" for s in part_plan))
        else:
            console.print(f"extracting {cfg.backbone} features of {source.name} -> {path} "
                          f"({planned_bytes(plan) / 2**30:.2f} GiB"
                          + (f", {cfg.views} augmented train views" if views else "")
                          + (f"; {launch.size} processes, one shard each)" if launch.size > 1 else ")"))
        try:
            if planned.pixels is not None:
                console.print(f"reading the images from the image cache {planned.pixels.path}"
                              + (f", held on {device} (--pixels-on-device)" if cfg.pixels_on_device else ""))
            skipped = SkippedImages(cfg.skip_bad, console)
            with writer.costed(device_label(device)):  # this call's wall seconds, added to a killed run's
                rate, extracted = _extract_splits(model, part, tspec, writer, cfg, layers, device, amp, console, views,
                                                  planned.corruption, planned.pixels, skipped)
                if skipped.found:
                    writer.add_skipped(skipped.ids)
                    skipped.finish(target)
            writer.finalize()
        finally:
            writer.close()
    if launch.is_main:
        if launch.size > 1:
            shards = [shard_path(path, rank, launch.size) for rank in range(launch.size)]
            wait_for(shards, console)
            join_shards(shards, path, meta, plan)
        console.print(f"[green]cache complete[/] {path}")
    written = source if launch.is_main else part  # rank 0 reports the joined cache, the others their shard
    return ExtractResult(path, False, {s: len(v) for s, v in written.splits.items() if s not in views}, rate, weights.random, extracted,
                         planned.build_s)


def _reuse(planned: PlannedCache, console: Console) -> ExtractResult:
    """The complete cache the settings name, reused as it is (its fingerprint checked against its name)."""
    path, fp = planned.path, planned.fingerprint
    with CacheReader(path) as reader:
        if reader.fingerprint != fp:  # a corrupted view's name leaves out its seed, so only that can differ
            why = (f"was corrupted with --corrupt-seed {reader.meta.corruption.get('seed')}" if planned.corruption
                   else "holds a different fingerprint than its name says")
            raise MedfmError(f"{path} {why}; remove it with `cache rm {path}`")
        rows = {s: len(reader.ids(s)) for s in reader.splits}
    console.print(f"[green]reusing cache[/] {path} (fingerprint {fp[:12]}, complete; nothing to extract)")
    return ExtractResult(path, True, rows, None, planned.weights.random, build_s=planned.build_s)


def _cache_meta(planned: PlannedCache, cfg: ExtractConfig) -> CacheMeta:
    """What the cache says about itself (`cache.schema.CacheMeta`): the backbone, the data, the task and the settings."""
    source, weights, model = planned.source, planned.weights, planned.model
    return CacheMeta(
        backbone=BackboneInfo(cfg.backbone, planned.spec.study_row, weights.random, weights.identity),
        dataset=DatasetInfo(source.name, source.options, planned.settings["manifest_hash"]),
        task=source.task, layers=tuple(planned.layers), num_layers=model.num_layers, settings=planned.settings,
        transform=planned.tspec.to_dict(), created=time.strftime("%Y-%m-%dT%H:%M:%S"), views=cfg.views, augment=cfg.augment,
        corruption=planned.corruption.to_dict() if planned.corruption else {},
        label_maps=source.label_maps,  # descriptive: how its classes map onto partner datasets', never fingerprinted
    )


@dataclass
class PlannedCache:
    """What an extraction's settings resolve to: the backbone, the dataset, the settings and the cache they name."""

    spec: Any
    source: DatasetSource
    weights: Any
    model: Backbone
    tspec: TransformSpec
    layers: list[int]
    settings: dict[str, Any]
    fingerprint: str
    path: Path
    manifest: Any
    corruption: Corruption | None = None  # a corrupted test view's cache (`corrupted_plan`); None: the clean cache
    pixels: CachedPixels | None = None  # the image cache the images are read from (`extract images`); None: the files
    build_s: float = 0.0  # seconds spent building the model and loading its weights, on the device


def corrupted_plan(planned: PlannedCache, corruption: Corruption) -> PlannedCache:
    """The cache of the test split under `corruption`, `<clean stem>+<kind>-<severity>.h5` beside the clean cache:
    the clean cache's settings plus `corrupt`, so its family is `<clean stem>+*.h5` (docs/robustness.md §1)."""
    source = planned.source
    if "test" not in source.splits:
        raise MedfmError(f"--corrupt corrupts the test split, and {source.name} has none (it has {', '.join(source.splits)})")
    if planned.tspec.resize < MIN_SIDE:
        raise MedfmError(f"--corrupt needs images of at least {MIN_SIDE} pixels after the resize, these are {planned.tspec.resize}; "
                         f"use --image-size {math.ceil(MIN_SIDE * CROP_FRACTION)} or more")
    settings = {**planned.settings, "corrupt": corruption.to_dict()}
    return replace(planned, source=replace(source, splits={"test": source.splits["test"]}), settings=settings,
                   fingerprint=fingerprint(settings), path=planned.path.with_name(f"{planned.path.stem}+{corruption.tag}.h5"),
                   corruption=corruption, build_s=0.0)  # the clean cache's model, built once


def plan_cache(cfg: ExtractConfig, device: torch.device, amp: torch.dtype | None, console: Console,
               source: DatasetSource | None = None) -> PlannedCache:
    """Resolve `cfg` to its settings, their fingerprint and the cache file they name (built or not): the one rule
    `extract run` and `extract zeroshot` share to find a cache."""
    spec = get_spec(cfg.backbone)
    source = source or get_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    if cfg.manifest is not None:
        source = source.with_manifest(read_manifest(cfg.manifest))
    check_study_inputs(cfg.protocol, source, cfg.norm, cfg.interpolation, cfg.in_chans)
    weights = resolve_weights(spec, cfg.weights, warn=console.print)
    started = time.perf_counter()
    model = create_backbone(cfg.backbone, weights, image_size=cfg.image_size, in_chans=cfg.in_chans, protocol=cfg.protocol,
                            **cfg.overrides)
    check_image_size(model, cfg.backbone)
    model = model.to(device).eval()
    build_s = time.perf_counter() - started
    wanted = range(model.num_layers) if cfg.layers is None else model.resolve_layers(cfg.layers)
    layers = sorted({model.num_layers - 1, *wanted})
    tspec, norm = input_spec(source, model.data_config, cfg.norm, cfg.in_chans, cfg.interpolation, cfg.workers)
    manifest = source.manifest()
    settings = {
        "backbone": cfg.backbone,
        "weights": weights.identity,
        "overrides": cfg.overrides,
        "transform": tspec.to_dict(),
        "decoder": DECODER_VERSION,  # how files became pixels (extract/datasets/decode.py)
        "norm": norm,
        "dataset": source.name,
        "root": str(Path(cfg.root).expanduser().resolve()) if cfg.root else None,  # other images, other features
        "dataset_options": source.options,
        "manifest_hash": manifest_hash(manifest),
        "layers": layers,
        "tokens": cfg.tokens,
        "token_dtype": cfg.token_dtype,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "views": view_settings(cfg),
        "protocol": cfg.protocol,
    }
    pixels = find_image_cache(source, cfg.root, tspec, cfg.image_cache, manifest=cfg.manifest)
    if pixels is not None and pixels.spec.jpeg_draft:  # draft-decoded JPEGs are other pixels, so other features
        settings["pixels"] = {"jpeg_draft": True}
    fp = fingerprint(settings)
    path = cache_path(cfg.out, cfg.backbone, source.name, fp)
    return PlannedCache(spec, source, weights, model, tspec, layers, settings, fp, path, manifest, pixels=pixels, build_s=build_s)


def view_settings(cfg: ExtractConfig) -> dict[str, Any] | None:
    """The augmented views' part of the settings. Views made on the device record it: they equal the PIL path's on the
    CPU (tests/extract/test_device_views.py), but until `make gpu-check` shows them equal on CUDA too such a cache is not
    taken for the loader's, nor the loader's for it. The eval view, a slice either way, leaves the fingerprint alone."""
    if not cfg.views:
        return None
    views = {"count": cfg.views, "augment": cfg.augment, "seed": cfg.augment_seed}
    return {**views, "on_device": True} if cfg.pixels_on_device else views


def existing_cache(cfg: ExtractConfig, console: Console | None = None) -> Path:
    """The complete cache `extract run` with these settings writes (or reuses), or one line saying to extract it first."""
    console = console or Console(stderr=True)
    check_input_settings(cfg.norm, cfg.in_chans, cfg.image_size, cfg.interpolation)
    check_views(cfg.views, cfg.augment)
    device = resolve_device(cfg.device)
    path = plan_cache(cfg, device, autocast_dtype(for_protocol(cfg.precision, cfg.protocol, device), device), console).path
    if not path.exists():
        raise MedfmError(f"no cache for these settings ({path} does not exist); run `extract run` with the same options first")
    return path


def split_plans(source: DatasetSource, features: dict[str, FeatureSpec]) -> dict[str, SplitPlan]:
    return {name: SplitPlan(split.ids, split.labels, features, split.metadata) for name, split in source.splits.items()}


def source_block(source: DatasetSource, rank: int, size: int) -> DatasetSource:
    """Process `rank`'s block of every split: rows [n * rank // size, n * (rank + 1) // size)."""
    blocks = {}
    for name, split in source.splits.items():
        start, stop = len(split) * rank // size, len(split) * (rank + 1) // size
        blocks[name] = Split(split.ids[start:stop], split.labels[start:stop], split.images[start:stop],
                             {c: v[start:stop] for c, v in split.metadata.items()})
    return replace(source, splits=blocks)


def group_images(source: DatasetSource, group: str, tspec: TransformSpec, view: int | None, seed: int,
                 corruption: Corruption | None = None, pixels: CachedPixels | None = None) -> ImageDataset:
    """The uint8 crops of one cache group (normalised on the device: `BackboneForward`): a split under the eval
    transform, or augmented train view `view`, image i drawn from `view_seed(seed, view, id_i)` whichever process, shard
    or worker decodes it; under `corruption`, image i corrupted from `view_seed(corruption.seed, CORRUPT_VIEW, id_i)`
    alike. `pixels`: read from that image cache."""
    shape = (tspec.channels, tspec.size, tspec.size)
    if view is None:
        images = ImageDataset(source, group, eval_crop(tspec, corruption), shape, pixels, dtype=torch.uint8)
        if corruption is not None:
            images.draw([view_seed(corruption.seed, CORRUPT_VIEW, i) for i in images.ids])
        return images
    images = ImageDataset(source, group, train_crop(tspec), shape, pixels, dtype=torch.uint8)
    images.draw([view_seed(seed, view, i) for i in images.ids])
    return images


def wait_for(shards: list[Path], console: Console, poll_s: float = 2.0) -> None:
    """Until every shard file is complete. torchrun stops all processes when one fails, so this ends."""
    missing = [s for s in shards if not s.exists()]
    if missing:
        console.print(f"waiting for {len(missing)} other process(es) to finish their shards")
    while any(not s.exists() for s in shards):
        time.sleep(poll_s)


def _extract_splits(
    model: Backbone, source: DatasetSource, tspec: TransformSpec, writer: CacheWriter, cfg: ExtractConfig,
    layers: list[int], device: torch.device, amp: torch.dtype | None, console: Console, views: dict[str, int],
    corruption: Corruption | None, pixels: CachedPixels | None, skipped: SkippedImages,
) -> tuple[float | None, int]:
    """Stream every split's remaining rows through the model into the writer thread; (images per second, images).

    One loader serves all splits (its workers start once and keep prefetching across split ends) and hands over uint8
    crops, normalised on the device (a quarter of float32's bytes through worker IPC and the host-to-device copy);
    outputs leave the device by asynchronous copies that the writer thread waits for, so the model
    is never held up by the device-to-host transfer or the disk. With `cfg.pixels_on_device` the batches are cut on the
    device from the image cache held there instead (`DeviceViews`), and no loader runs.
    """
    segments = [(name, writer.rows(name), len(split)) for name, split in source.splits.items() if writer.rows(name) < len(split)]
    if not segments:
        return None, 0
    held = DeviceViews(pixels, source, tspec, device, cfg.augment_seed) if cfg.pixels_on_device else None  # before the batch size
    forward = BackboneForward(model, layers, device, amp, Normalize(tspec))
    batch_size = forward.auto_batch_size((tspec.channels, tspec.size, tspec.size)) if cfg.batch_size == "auto" else int(cfg.batch_size)
    if cfg.compile:
        forward.compile(cfg.compile_backend)
    loader, firsts, total = (_device_batches(held, segments, batch_size, views) if held is not None
                             else _loader(source, segments, batch_size, tspec, cfg, device, views, corruption, pixels))
    token_dtype = getattr(torch, cfg.token_dtype)
    int8 = cfg.token_dtype == "int8"
    what = f"{cfg.backbone} / {source.name}"
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console, transient=False)
    pace = Pace(console, f"extracting {what}", total, unit="image")  # plain lines in logs, where no bar shows
    start_time, seen = time.perf_counter(), 0
    with WriterThread(writer) as write, progress:
        bar = progress.add_task(what, total=total, rate="-")
        for (split_name, row), (images, ok, errors) in zip(firsts, loader, strict=True):
            skipped.check(ok, errors, source.splits[split_name].ids[row : row + len(ok)])
            outputs: dict[str, torch.Tensor] = {}
            for index, f in forward(images).items():
                outputs[feature_key("pooled", index, model.num_layers)] = f.pooled.float().to("cpu", non_blocking=True)
                if cfg.tokens:
                    key = feature_key("tokens", index, model.num_layers)
                    tokens, scales = quantize(f.tokens) if int8 else (f.tokens.to(token_dtype), None)
                    outputs[key] = tokens.to("cpu", non_blocking=True)
                    if scales is not None:
                        outputs[scale_key(key)] = scales.to("cpu", non_blocking=True)
            write(split_name, row, outputs, ok.numpy(), device)
            seen += len(images)
            rate = seen / (time.perf_counter() - start_time)
            progress.update(bar, advance=len(images), rate=f"{rate:.1f}")
            pace.step(seen, f"{rate:.1f} img/s")
    return seen / (time.perf_counter() - start_time), seen


def _loader(source: DatasetSource, segments: list[tuple[str, int, int]], batch_size: int, tspec: TransformSpec, cfg: ExtractConfig,
            device: torch.device, views: dict[str, int], corruption: Corruption | None, pixels: CachedPixels | None,
            ) -> tuple[torch.utils.data.DataLoader, list[tuple[str, int]], int]:
    """One loader over the missing rows of every group, in batches that never straddle two groups; with each batch's
    (group, first row) and the number of images."""
    data = torch.utils.data.ConcatDataset(
        [torch.utils.data.Subset(group_images(source, name, tspec, views.get(name), cfg.augment_seed, corruption, pixels),
                                 range(start, stop)) for name, start, stop in segments]
    )
    batches: list[list[int]] = []  # indices into `data`
    firsts: list[tuple[str, int]] = []
    offset = 0
    for name, start, stop in segments:
        for row in range(start, stop, batch_size):
            size = min(batch_size, stop - row)
            batches.append(list(range(offset, offset + size)))
            firsts.append((name, row))
            offset += size
    workers = min(loader_workers(cfg.workers, device), len(batches))
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_BATCHES if workers else None,
    )
    return loader, firsts, offset


def _device_batches(held: DeviceViews, segments: list[tuple[str, int, int]], batch_size: int, views: dict[str, int],
                    ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]], list[tuple[str, int]], int]:
    """`_loader`'s batches, cut on the device: the same groups, rows and batch bounds, each made when the model asks."""
    bounds = [(name, row, min(row + batch_size, stop)) for name, start, stop in segments for row in range(start, stop, batch_size)]
    batches = (held.batch(name, views.get(name), row, end) for name, row, end in bounds)
    return batches, [(name, row) for name, row, _ in bounds], sum(stop - start for _, start, stop in segments)


class WriterThread:
    """Writes batches into the cache on a thread of its own, behind a bounded queue (the model never runs far ahead of
    the disk); a write that fails stops the extraction at its next batch with the writer's own error."""

    def __init__(self, writer: CacheWriter) -> None:
        self.writer = writer
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, name="cache-writer", daemon=True)

    def __enter__(self) -> Callable[..., None]:
        self.thread.start()
        return self.put

    def __exit__(self, *exc: object) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.failure and exc[0] is None:
            raise self.failure[0]

    def put(self, split: str, row: int, outputs: dict[str, torch.Tensor], ok: np.ndarray, device: torch.device) -> None:
        """Queue one batch whose outputs are being copied off `device` (the thread waits for the copies to land)."""
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        self.jobs.put((split, row, outputs, ok, copied))
        if self.failure:
            raise self.failure[0]

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            split, row, outputs, ok, copied = job
            if not self.failure:
                try:
                    if copied is not None:
                        copied.synchronize()  # the asynchronous device-to-host copies have landed
                    self.writer.write(split, row, {k: v.numpy() for k, v in outputs.items()}, ok)
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    self.failure.append(err)
