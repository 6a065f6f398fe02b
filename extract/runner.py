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
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cache.errors import MedfmError
from cache.fingerprint import fingerprint, manifest_hash
from cache.runtime import output_root, rank_device, resolve_device, torchrun_launch
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan, join_shards, partial_path, shard_path
from extract.backbones import Backbone, DataConfig, Features, create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, find_default_weights, missing_weights_message, resolve_weights
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource, Split
from extract.datasets.images import ImageDataset
from extract.datasets.splits import read_manifest
from extract.transforms import TransformSpec, eval_transform, make_spec

TOKEN_DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMS = ("model", "dataset", "study")
INTERPOLATIONS = ("model", "bilinear", "bicubic")  # model: the backbone's own; the study resized bilinearly
MAX_WORKERS = 12
PREFETCH_BATCHES = 4  # per worker: enough to ride out a slow image, bounded so memory stays flat
CPU_BATCH = 16  # what --batch-size auto means on the CPU
AUTO_BATCH_CAP = 256  # beyond this a GPU's throughput no longer grows, only the memory held
NORM_IMAGES = 500  # train images (evenly spaced) behind --norm dataset; the count enters the fingerprint


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
    skip_bad: bool = False
    manifest: Path | None = None  # a saved <cache>.splits.json: reproduce that split instead of the dataset's own
    dataset_options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone constructor overrides (tests, tiny models)


@dataclass
class ExtractResult:
    path: Path
    reused: bool
    rows: dict[str, int]
    images_per_s: float | None
    random_weights: bool


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` is bf16 on CUDA and fp32 on CPU (CPU bf16 is slower)."""
    if precision not in PRECISIONS:
        raise MedfmError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resolve_extract_weights(name: str, weights: str, console: Console) -> ResolvedWeights:
    """`auto` means the official weights when present, else random weights, announced loudly."""
    spec = get_spec(name)
    if weights != "auto":
        return resolve_weights(spec, weights)
    if find_default_weights(spec) is not None:
        return resolve_weights(spec, "default")
    console.print(f"[bold red]WARNING: RANDOM WEIGHTS for {name}[/]: {missing_weights_message(spec)}. "
                  "Scores from these features say nothing about the pretrained model.")
    return resolve_weights(spec, "random")


def cache_path(out: Path, backbone: str, dataset: str, fp: str) -> Path:
    return Path(out) / backbone / f"{dataset}-{fp[:12]}.h5"


def feature_plan(model: Backbone, layers: Sequence[int], tokens: bool, token_dtype: str, device: torch.device) -> dict[str, FeatureSpec]:
    """Names and shapes of the stored arrays, from one forward pass on zeros."""
    size = model.data_config.input_size
    with torch.inference_mode():
        feats = model.forward_layers(torch.zeros(1, model.in_chans, size, size, device=device), layers)
    last = model.num_layers - 1
    plan: dict[str, FeatureSpec] = {}
    for index, f in feats.items():
        suffix = "" if index == last else f"@{index}"
        plan[f"pooled{suffix}"] = FeatureSpec(tuple(f.pooled.shape[1:]), "float32")
        if tokens:
            plan[f"tokens{suffix}"] = FeatureSpec(tuple(f.tokens.shape[1:]), token_dtype)
    return plan


def uses_channels_last(model: nn.Module) -> bool:
    """CNNs (most weights in 2-D convolutions) run faster channels-last (cuDNN and oneDNN NHWC kernels); ViTs do not care."""
    conv = sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    return conv > 0.5 * sum(p.numel() for p in model.parameters())


class BackboneForward:
    """The backbone as extraction runs it: on its device, channels-last when a CNN, autocast, no autograd.

    The benchmark's bare forward uses this same object, so the two differ only by the pipeline around it.
    """

    def __init__(self, model: Backbone, layers: Sequence[int], device: torch.device, amp: torch.dtype | None) -> None:
        self.memory_format = torch.channels_last if uses_channels_last(model) else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format).eval()
        self.layers, self.device, self.amp = list(layers), device, amp
        self._forward_layers = self.model.forward_layers

    def compile(self) -> None:
        """torch.compile the forward (the first batches pay the compilation)."""
        self._forward_layers = torch.compile(self.model.forward_layers)

    def __call__(self, images: torch.Tensor) -> dict[int, Features]:
        # move first (an asynchronous copy from pinned memory), then change the layout on the device
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
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


def check_input_settings(norm: str, in_chans: int, image_size: int | None, interpolation: str) -> None:
    """What extract and finetune both feed a backbone: normalisation, channels, input size and resampling."""
    if norm not in NORMS:
        raise MedfmError(f"--norm must be one of {', '.join(NORMS)}, got {norm}")
    if interpolation not in INTERPOLATIONS:
        raise MedfmError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation}")
    if in_chans not in (1, 3):
        raise MedfmError(f"--in-chans must be 1 (grayscale) or 3, got {in_chans}")
    if image_size is not None and image_size < 16:
        raise MedfmError(f"--image-size must be at least 16, got {image_size}")


def extract(cfg: ExtractConfig, console: Console | None = None) -> ExtractResult:
    """Extract features of every split of `cfg.dataset` with `cfg.backbone` into a fingerprinted cache."""
    launch = torchrun_launch()
    console = console or Console(stderr=True, quiet=not launch.is_main)  # one progress bar: rank 0's
    check_input_settings(cfg.norm, cfg.in_chans, cfg.image_size, cfg.interpolation)
    if cfg.batch_size != "auto" and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise MedfmError(f"--batch-size must be auto or at least 1, got {cfg.batch_size}")
    if cfg.token_dtype not in TOKEN_DTYPES:
        raise MedfmError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {cfg.token_dtype}")
    device = rank_device(resolve_device(cfg.device), launch)
    amp = autocast_dtype(cfg.precision, device)

    # --- settings -> fingerprint -> reuse?
    spec = get_spec(cfg.backbone)
    source = get_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    if cfg.manifest is not None:
        source = source.with_manifest(read_manifest(cfg.manifest))
    weights = resolve_extract_weights(cfg.backbone, cfg.weights, console)
    model = create_backbone(cfg.backbone, weights, image_size=cfg.image_size, in_chans=cfg.in_chans, **cfg.overrides)
    model = model.to(device).eval()
    try:
        wanted = range(model.num_layers) if cfg.layers is None else model.resolve_layers(cfg.layers)
        layers = sorted({model.num_layers - 1, *wanted})
    except ValueError as err:
        raise MedfmError(f"--layers: {err}") from None
    tspec, norm = input_spec(source, model.data_config, cfg.norm, cfg.in_chans, cfg.interpolation, cfg.workers)
    manifest = source.manifest()
    settings = {
        "backbone": cfg.backbone,
        "weights": weights.identity,
        "overrides": cfg.overrides,
        "transform": tspec.to_dict(),
        "norm": norm,
        "dataset": source.name,
        "root": str(Path(cfg.root).expanduser().resolve()) if cfg.root else None,  # other images, other features
        "dataset_options": source.options,
        "manifest_hash": manifest_hash(manifest),
        "layers": layers,
        "tokens": cfg.tokens,
        "token_dtype": cfg.token_dtype,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
    }
    fp = fingerprint(settings)
    path = cache_path(cfg.out, cfg.backbone, source.name, fp)
    manifest_file = path.with_suffix(".splits.json")
    if path.exists():
        with CacheReader(path) as reader:
            if reader.fingerprint != fp:
                raise MedfmError(f"{path} holds a different fingerprint than its name says; remove it with `cache rm {path}`")
            rows = {s: len(reader.ids(s)) for s in reader.splits}
        console.print(f"[green]reusing cache[/] {path} (fingerprint {fp[:12]}, complete; nothing to extract)")
        return ExtractResult(path, True, rows, None, weights.random)

    # --- plan -> writer (resumes a partial file with the same fingerprint)
    features = feature_plan(model, layers, cfg.tokens, cfg.token_dtype, device)
    meta = {
        "settings": settings,
        "backbone": {"name": cfg.backbone, "study_row": spec.study_row, "random_weights": weights.random, **weights.identity},
        "dataset": {"name": source.name, "options": source.options, "manifest_hash": settings["manifest_hash"]},
        "task": source.task.to_dict(),
        "transform": tspec.to_dict(),
        "layers": layers,
        "skipped": [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # this process's part: the whole cache, or under torchrun its shard (a contiguous block of every split)
    part, target = source, path
    if launch.size > 1:
        part, target = source_block(source, launch.rank, launch.size), shard_path(path, launch.rank, launch.size)
    if launch.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest_file.write_text(json.dumps(manifest))
    rate = None
    if not target.exists():  # a shard finished before an interruption is kept
        resuming = partial_path(target).exists()
        part_plan = split_plans(part, features)
        writer = CacheWriter.open(target, fp, meta, part_plan)
        done = {s: writer.rows(s) for s in part_plan}
        if resuming and any(done.values()):
            console.print(f"resuming {partial_path(target).name}: " + ", ".join(f"{s} {done[s]}/{writer.planned(s)}" for s in part_plan))
        else:
            console.print(f"extracting {cfg.backbone} features of {source.name} -> {path}"
                          + (f" ({launch.size} processes, one shard each)" if launch.size > 1 else ""))
        try:
            skipped, rate = _extract_splits(model, part, tspec, writer, cfg, layers, device, amp, console)
            if skipped:
                writer.set_meta(skipped=writer.meta().get("skipped", []) + skipped)
            writer.finalize()
        finally:
            writer.close()
    if launch.is_main:
        if launch.size > 1:
            shards = [shard_path(path, rank, launch.size) for rank in range(launch.size)]
            wait_for(shards, console)
            join_shards(shards, path, fp, meta, split_plans(source, features))
        console.print(f"[green]cache complete[/] {path}")
    written = source if launch.is_main else part  # rank 0 reports the joined cache, the others their shard
    return ExtractResult(path, False, {s: len(v) for s, v in written.splits.items()}, rate, weights.random)


def split_plans(source: DatasetSource, features: dict[str, FeatureSpec]) -> dict[str, SplitPlan]:
    return {name: SplitPlan(split.ids, split.labels, features) for name, split in source.splits.items()}


def source_block(source: DatasetSource, rank: int, size: int) -> DatasetSource:
    """Process `rank`'s block of every split: rows [n * rank // size, n * (rank + 1) // size)."""
    blocks = {}
    for name, split in source.splits.items():
        start, stop = len(split) * rank // size, len(split) * (rank + 1) // size
        blocks[name] = Split(split.ids[start:stop], split.labels[start:stop], split.images[start:stop])
    return replace(source, splits=blocks)


def wait_for(shards: list[Path], console: Console, poll_s: float = 2.0) -> None:
    """Until every shard file is complete. torchrun stops all processes when one fails, so this ends."""
    missing = [s for s in shards if not s.exists()]
    if missing:
        console.print(f"waiting for {len(missing)} other process(es) to finish their shards")
    while any(not s.exists() for s in shards):
        time.sleep(poll_s)


def cpu_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(workers: int | None, device: torch.device | None = None) -> int:
    """`--workers`, else the default for a model running on `device`."""
    return workers if workers is not None else default_workers(device)


def default_workers(device: torch.device | None = None) -> int:
    """Decoding workers for a model running on `device` (None: no model runs alongside).

    With the model on a GPU, or none, every core but one decodes (at most 12). With the model on the
    CPU its threads already fill the cores and a worker fights them for the same cores: on 2 cores,
    decoding in-line gave 0.97 of the bare forward's speed and one worker 0.91 (bench/extraction.py).
    So up to 4 cores decode in-line, and larger CPUs lend a quarter of their cores to decoding.
    """
    cores = cpu_cores()
    if device is not None and device.type == "cpu":
        return 0 if cores <= 4 else min(MAX_WORKERS, cores // 4)
    return min(MAX_WORKERS, cores - 1)


def input_spec(
    source: DatasetSource, dc: DataConfig, norm: str, in_chans: int, interpolation: str, workers: int | None,
) -> tuple[TransformSpec, dict[str, Any]]:
    """The eval transform of the backbone's data config under the input settings, and how it normalises.

    `norm`: model (the backbone's mean/std), dataset (the train split's) or study (the study's constants);
    `interpolation`: model (the backbone's, bicubic for most) or a torchvision mode (the study's Resize: bilinear).
    """
    mode = dc.interpolation if interpolation == "model" else interpolation
    mean, std, how = dc.mean, dc.std, {"kind": "model"}
    if norm == "dataset":
        mean, std, how = dataset_norm(source, dc.input_size, mode, in_chans, workers)
    elif norm == "study":
        mean, std, how = study_norm(source, in_chans)
    return make_spec(dc.input_size, mean, std, mode, in_chans), how


def dataset_norm(
    source: DatasetSource, size: int, interpolation: str, channels: int, workers: int | None,
) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """Per-channel mean/std of the train images after the eval resize and crop, from an evenly spaced sample.

    The study normalises every model with its dataset's statistics rather than the model's own.
    """
    if "train" not in source.splits:
        raise MedfmError(f"--norm dataset needs a train split; {source.name} has {', '.join(source.splits)}")
    plain = make_spec(size, (0.0,) * 3, (1.0,) * 3, interpolation, channels)
    count = len(source.splits["train"])
    rows = np.unique(np.linspace(0, count - 1, min(count, NORM_IMAGES)).round().astype(int)).tolist()
    data = torch.utils.data.Subset(ImageDataset(source, "train", eval_transform(plain), (channels, size, size)), rows)
    total, squares, pixels = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    for images, ok, _ in torch.utils.data.DataLoader(data, batch_size=32, num_workers=loader_workers(workers)):
        x = images[ok].double()
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
        pixels += x.shape[0] * size * size
    if pixels == 0:
        raise MedfmError(f"--norm dataset: none of the sampled train images of {source.name} could be read")
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt()
    rounded = [tuple(round(v, 6) for v in t.tolist()) for t in (mean, std)]
    return rounded[0], rounded[1], {"kind": "dataset", "images": len(rows)}


def study_norm(source: DatasetSource, channels: int) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """The study's fixed mean/std of this dataset (paper.md §1), to reproduce its inputs exactly.

    Grayscale datasets have one value, repeated when the gray image is fed as RGB (without --in-chans 1).
    """
    if source.study_norm is None:
        raise MedfmError(f"--norm study: {source.name} is not one of the study's datasets (aptos2019, isic2019, ddsm, "
                         "chexpert), so it has no study statistics; use --norm dataset")
    mean, std = source.study_norm
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise MedfmError(f"--norm study: {source.name}'s statistics are for {len(mean)} channels, not {channels}; drop --in-chans {channels}")
    return mean, std, {"kind": "study"}


def _extract_splits(
    model: Backbone, source: DatasetSource, tspec: TransformSpec, writer: CacheWriter, cfg: ExtractConfig,
    layers: list[int], device: torch.device, amp: torch.dtype | None, console: Console,
) -> tuple[list[str], float | None]:
    """Stream every split's remaining rows through the model into the writer thread.

    One loader serves all splits (its workers start once and keep prefetching across split ends);
    outputs leave the device by asynchronous copies that the writer thread waits for, so the model
    is never held up by the device-to-host transfer or the disk.
    """
    segments = [(name, writer.rows(name), len(split)) for name, split in source.splits.items() if writer.rows(name) < len(split)]
    if not segments:
        return [], None
    shape = (tspec.channels, tspec.size, tspec.size)
    forward = BackboneForward(model, layers, device, amp)
    batch_size = forward.auto_batch_size(shape) if cfg.batch_size == "auto" else int(cfg.batch_size)
    if cfg.compile:
        forward.compile()
    transform = eval_transform(tspec)
    data = torch.utils.data.ConcatDataset(
        [torch.utils.data.Subset(ImageDataset(source, name, transform, shape), range(start, stop)) for name, start, stop in segments]
    )
    batches: list[list[int]] = []  # indices into `data`; a batch never straddles two splits
    firsts: list[tuple[str, int]] = []  # (split, first row) of each batch
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
    token_dtype = getattr(torch, cfg.token_dtype)
    last = model.num_layers - 1
    skipped: list[str] = []

    jobs: queue.Queue = queue.Queue(maxsize=4)  # bounded: the model never runs far ahead of the disk
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (job := jobs.get()) is not None:
            split_name, row, outputs, ok, copied = job
            if not failure:
                try:
                    if copied is not None:
                        copied.synchronize()  # the asynchronous device-to-host copies have landed
                    writer.write(split_name, row, {k: v.numpy() for k, v in outputs.items()}, ok)
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(err)

    thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
    thread.start()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console, transient=False)
    start_time, seen = time.perf_counter(), 0
    try:
        with progress:
            bar = progress.add_task(f"{cfg.backbone} / {source.name}", total=offset, rate="-")
            for (split_name, row), (images, ok, errors) in zip(firsts, loader, strict=True):
                if not bool(ok.all()):
                    bad = [e for e, good in zip(errors, ok.tolist(), strict=True) if not good]
                    if not cfg.skip_bad:
                        raise MedfmError(f"cannot read image {bad[0]}; fix or remove it, or pass --skip-bad to skip unreadable images")
                    ids = source.splits[split_name].ids
                    skipped.extend(ids[row + i] for i, good in enumerate(ok.tolist()) if not good)
                    console.print(f"[yellow]skipped {len(bad)} unreadable image(s)[/]: {bad[0]}")
                outputs: dict[str, torch.Tensor] = {}
                for index, f in forward(images).items():
                    suffix = "" if index == last else f"@{index}"
                    outputs[f"pooled{suffix}"] = f.pooled.float().to("cpu", non_blocking=True)
                    if cfg.tokens:
                        outputs[f"tokens{suffix}"] = f.tokens.to(token_dtype).to("cpu", non_blocking=True)
                copied = torch.cuda.Event() if device.type == "cuda" else None
                if copied is not None:
                    copied.record()
                jobs.put((split_name, row, outputs, ok.numpy(), copied))
                if failure:
                    raise failure[0]
                seen += len(images)
                rate = seen / (time.perf_counter() - start_time)
                progress.update(bar, advance=len(images), rate=f"{rate:.1f}")
    finally:
        jobs.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return skipped, seen / (time.perf_counter() - start_time)
