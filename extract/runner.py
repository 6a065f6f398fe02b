"""The extraction loop: loader -> model -> bounded writer queue -> cache.

Read `extract` top to bottom: resolve settings and the fingerprint, reuse a complete cache when the
fingerprint matches, else open (or resume) the partial file and stream every split through the model
while a writer thread flushes finished batches to disk.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cache.errors import MedfmError
from cache.fingerprint import fingerprint, manifest_hash
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan, partial_path
from extract.backbones import Backbone, create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, find_default_weights, missing_weights_message, resolve_weights
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource, ImageDataset
from extract.datasets.splits import read_manifest
from extract.transforms import TransformSpec, eval_transform, make_spec

TOKEN_DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NORMS = ("model", "dataset")
NORM_IMAGES = 500  # train images (evenly spaced) behind --norm dataset; the count enters the fingerprint


def default_output() -> Path:
    return Path(os.environ.get("MEDFM_OUTPUT", "outputs"))


@dataclass
class ExtractConfig:
    backbone: str
    dataset: str
    root: Path | None = None
    weights: str = "default"  # default | random | auto (default, else random with a warning) | PATH
    out: Path = field(default_factory=lambda: default_output() / "features")
    batch_size: int = 16
    tokens: bool = True
    token_dtype: str = "float16"
    layers: Sequence[int] | None = (-1,)  # None: every block
    image_size: int | None = None
    in_chans: int = 3  # 1: grayscale input, first conv rebuilt from the pretrained R-channel kernel (the study's recipe)
    norm: str = "model"  # model: the backbone's own mean/std | dataset: the train split's (the study's choice)
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MedfmError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedfmError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    return dev


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


def extract(cfg: ExtractConfig, console: Console | None = None) -> ExtractResult:
    """Extract features of every split of `cfg.dataset` with `cfg.backbone` into a fingerprinted cache."""
    console = console or Console(stderr=True)
    if cfg.norm not in NORMS:
        raise MedfmError(f"--norm must be one of {', '.join(NORMS)}, got {cfg.norm}")
    if cfg.in_chans not in (1, 3):
        raise MedfmError(f"--in-chans must be 1 (grayscale) or 3, got {cfg.in_chans}")
    if cfg.batch_size < 1:
        raise MedfmError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.token_dtype not in TOKEN_DTYPES:
        raise MedfmError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, got {cfg.token_dtype}")
    device = resolve_device(cfg.device)
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
    dc = model.data_config
    mean, std, norm = dc.mean, dc.std, {"kind": "model"}
    if cfg.norm == "dataset":
        mean, std, norm = dataset_norm(source, dc.input_size, dc.interpolation, cfg)
    tspec = make_spec(dc.input_size, mean, std, dc.interpolation, cfg.in_chans)
    manifest = source.manifest()
    settings = {
        "backbone": cfg.backbone,
        "weights": weights.identity,
        "overrides": cfg.overrides,
        "transform": tspec.to_dict(),
        "norm": norm,
        "dataset": source.name,
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
    plan = {name: SplitPlan(split.ids, split.labels, features) for name, split in source.splits.items()}
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
    resuming = partial_path(path).exists()
    writer = CacheWriter.open(path, fp, meta, plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(manifest))
    done = {s: writer.rows(s) for s in plan}
    if resuming and any(done.values()):
        console.print(f"resuming {partial_path(path).name}: " + ", ".join(f"{s} {done[s]}/{writer.planned(s)}" for s in plan))
    else:
        console.print(f"extracting {cfg.backbone} features of {source.name} -> {path}")
    try:
        skipped, rate = _extract_splits(model, source, tspec, writer, cfg, layers, device, amp, console)
        if skipped:
            writer.set_meta(skipped=writer.meta().get("skipped", []) + skipped)
        writer.finalize()
    finally:
        writer.close()
    console.print(f"[green]cache complete[/] {path}")
    return ExtractResult(path, False, {s: len(v) for s, v in source.splits.items()}, rate, weights.random)


def loader_workers(cfg: ExtractConfig) -> int:
    return cfg.workers if cfg.workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))


def dataset_norm(source: DatasetSource, size: int, interpolation: str, cfg: ExtractConfig) -> tuple[tuple[float, ...], tuple[float, ...], dict[str, Any]]:
    """Per-channel mean/std of the train images after the eval resize and crop, from an evenly spaced sample.

    The study normalises every model with its dataset's statistics rather than the model's own.
    """
    if "train" not in source.splits:
        raise MedfmError(f"--norm dataset needs a train split; {source.name} has {', '.join(source.splits)}")
    channels = cfg.in_chans
    plain = make_spec(size, (0.0,) * 3, (1.0,) * 3, interpolation, channels)
    count = len(source.splits["train"])
    rows = np.unique(np.linspace(0, count - 1, min(count, NORM_IMAGES)).round().astype(int)).tolist()
    data = torch.utils.data.Subset(ImageDataset(source, "train", eval_transform(plain), (channels, size, size)), rows)
    total, squares, pixels = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0
    for images, ok, _ in torch.utils.data.DataLoader(data, batch_size=32, num_workers=loader_workers(cfg)):
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


def _extract_splits(
    model: Backbone, source: DatasetSource, tspec: TransformSpec, writer: CacheWriter, cfg: ExtractConfig,
    layers: list[int], device: torch.device, amp: torch.dtype | None, console: Console,
) -> tuple[list[str], float | None]:
    """Stream every split's remaining rows through the model into the writer thread."""
    transform = eval_transform(tspec)
    shape = (tspec.channels, tspec.size, tspec.size)
    workers = loader_workers(cfg)
    token_dtype = getattr(torch, cfg.token_dtype)
    last = model.num_layers - 1
    skipped: list[str] = []
    todo = {s: writer.planned(s) - writer.rows(s) for s in source.splits}
    total = sum(todo.values())
    if total == 0:
        return skipped, None

    jobs: queue.Queue = queue.Queue(maxsize=4)  # bounded: the model never runs far ahead of the disk
    failure: list[BaseException] = []

    def write_loop() -> None:
        while (job := jobs.get()) is not None:
            if not failure:
                try:
                    writer.write(*job)
                except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                    failure.append(err)

    thread = threading.Thread(target=write_loop, name="cache-writer", daemon=True)
    thread.start()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), console=console, transient=False)
    start_time, seen = time.perf_counter(), 0
    try:
        with progress:
            bar = progress.add_task(f"{cfg.backbone} / {source.name}", total=total, rate="-")
            for split_name, split in source.splits.items():
                start = writer.rows(split_name)
                if start >= len(split):
                    continue
                data = torch.utils.data.Subset(ImageDataset(source, split_name, transform, shape), range(start, len(split)))
                loader = torch.utils.data.DataLoader(
                    data, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                    pin_memory=device.type == "cuda", persistent_workers=False,
                    prefetch_factor=4 if workers else None,
                )
                row = start
                for images, ok, errors in loader:
                    if not bool(ok.all()):
                        bad = [e for e, good in zip(errors, ok.tolist()) if not good]
                        if not cfg.skip_bad:
                            raise MedfmError(f"cannot read image {bad[0]}; fix or remove it, or pass --skip-bad to skip unreadable images")
                        skipped.extend(split.ids[row + i] for i, good in enumerate(ok.tolist()) if not good)
                        console.print(f"[yellow]skipped {len(bad)} unreadable image(s)[/]: {bad[0]}")
                    images = images.to(device, non_blocking=True)
                    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        feats = model.forward_layers(images, layers)
                    arrays: dict[str, np.ndarray] = {}
                    for index, f in feats.items():
                        suffix = "" if index == last else f"@{index}"
                        arrays[f"pooled{suffix}"] = f.pooled.float().cpu().numpy()
                        if cfg.tokens:
                            arrays[f"tokens{suffix}"] = f.tokens.to(token_dtype).cpu().numpy()
                    jobs.put((split_name, row, arrays, ok.numpy()))
                    if failure:
                        raise failure[0]
                    row += len(images)
                    seen += len(images)
                    rate = seen / (time.perf_counter() - start_time)
                    progress.update(bar, advance=len(images), rate=f"{rate:.1f}")
    finally:
        jobs.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return skipped, seen / (time.perf_counter() - start_time)
