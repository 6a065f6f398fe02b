"""Benchmark 1: the whole extraction pipeline against the bare model forward.

Pipeline: `extract.runner.extract` end to end (settings, cache file, decode, transform, forward, HDF5 write,
finalize) into a fresh cache folder, less the seconds it spent building the model and loading its weights
(`ExtractResult.build_s`, recorded as `model_build_s`): the bare forward's model is built before its clock starts,
and anyone who runs the model pays that build. Bare: the same model, through the same `BackboneForward` the
runner uses, on the same images already decoded and on the device, in the same batches. The ratio
bare time / pipeline time is the share of the model's own speed that the pipeline delivers: its median over the rounds,
the bare forward timed right before and after every pipeline run (`bench.common.bracketed_ratios`).

A ViT (DeiT-S shape) and a CNN (ResNet-50 shape, run channels-last) with random weights, at 224 px,
on the synthetic demo set, with the runner's default batch size for the device. The pipeline runs with the runner's
default loader workers (`common.runtime.default_workers`: on a CPU of up to 4 cores, decoding in-line), the ratio held
to the target; and, in rounds of its own after those, with 2 workers, reported beside it.
Also the bytes of one image crossing the worker boundary: the uint8 crop the workers hand over now (normalised on the
device) over the normalised float32 image they handed over before (`extract.transforms.eval_transform`).
`--smoke`: a one-block ViT and a one-block-per-stage ResNet at 32 px, 20 images, one round.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from bench.common import (
    SMOKE_IMAGE_SIZE,
    SMOKE_RESNET,
    SMOKE_VIT,
    LeftOut,
    at_least,
    at_most,
    bracketed_ratios,
    device,
    fastest_rounds,
    record,
    run_bench,
    sync,
)
from common.runtime import default_workers
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.datasets.images import ImageDataset
from extract.runner import CPU_BATCH, BackboneForward, ExtractConfig, ExtractResult, autocast_dtype, extract, group_images
from extract.transforms import TransformSpec, eval_transform, make_spec

MODELS = {
    "vit": ("deit", {"embed_dim": 384, "depth": 12, "num_heads": 6}),  # DeiT-S shape, 22M parameters
    "cnn": ("resnet152", {"layers": [3, 4, 6, 3]}),  # ResNet-50 shape, channels-last
}
IMAGE_SIZE = 224
PER_CLASS = 40  # 4 classes -> 160 images, 96/32/32 over train/val/test: whole batches of 16, as nearly all of a real split's
ROUNDS = 7  # odd: the median is one round's ratio; the rounds spread about 0.06 here, and 7 rather than 5 narrow the median's by a sixth
WORKERS_ROUNDS = 3  # of the pipeline with WORKERS workers, reported beside the target's
TARGET = 0.9
WORKERS = 2
TARGET_BYTES = 0.25  # uint8 crops over float32 images
SMOKE_MODELS = {"vit": ("deit", SMOKE_VIT), "cnn": ("resnet152", SMOKE_RESNET)}
SMOKE_PER_CLASS = 5  # 20 images


def bare_inputs(forward: BackboneForward, batch_size: int, per_class: int = PER_CLASS) -> list[torch.Tensor]:
    """The demo images decoded and transformed once, on the device, in the runner's batches (per split)."""
    source = get_dataset("demo", None, per_class=per_class)
    dc = forward.model.data_config
    spec = make_spec(dc.input_size, dc.mean, dc.std, dc.interpolation)
    batches = []
    for split in source.splits:
        data = ImageDataset(source, split, eval_transform(spec), (3, dc.input_size, dc.input_size))
        images = torch.stack([data[i][0] for i in range(len(data))]).to(forward.device)
        batches += list(images.split(batch_size))
    return batches


def crossing_bytes(spec: TransformSpec) -> dict[str, int]:
    """Bytes of one demo image as a loader worker hands it over: the float32 image before, the uint8 crop now."""
    source = get_dataset("demo", None, per_class=SMOKE_PER_CLASS)
    crops = group_images(source, "test", spec, None, 0)
    return {"before": eval_transform(spec)(crops.load(0)).nbytes, "after": crops[0][0].nbytes}


def compare(name: str, backbone: str, overrides: dict, dev: torch.device, work: Path, image_size: int = IMAGE_SIZE,
            per_class: int = PER_CLASS, rounds: int = ROUNDS, workers: int | None = None, compile: bool = False,
            batch_size: int | None = None, precision: str = "auto", compile_backend: str = "inductor",
            more_workers: tuple[int, ...] = (), more_rounds: int | None = None) -> dict[str, float]:
    """Images/s of the fastest pipeline and bare rounds, the pipeline's share of the bare speed (`bracketed_ratios`), and
    the runner's own streaming rate (`bench.gpu_check` too). `workers`: the pipeline's `--workers`, None the runner's
    default; each of `more_workers` is one more pipeline, timed after them in `more_rounds` rounds (None: `rounds`) of
    its own, its images/s and ratio under keys ending `_<n>_workers`.

    `compile`: both under torch.compile, the pipeline as `extract run --compile`. The bare warm-up compiles every batch
    shape, and the pipeline's own model, an instance of the same class, reuses that compiled code (dynamo guards on
    the module's type and tensors' shapes, not on the instance), so the rounds time the compiled steady state.
    `batch_size`: None is the runner's `--batch-size auto`; `precision`: the runner's `--precision`.
    """
    cfg = ExtractConfig(backbone=backbone, dataset="demo", weights="random", image_size=image_size, device=str(dev),
                        precision=precision, dataset_options={"per_class": per_class}, overrides=overrides, workers=workers,
                        compile=compile, compile_backend=compile_backend)
    model = create_backbone(backbone, "random", image_size=image_size, **overrides)
    forward = BackboneForward(model, [model.num_layers - 1], dev, autocast_dtype(cfg.precision, dev))
    if batch_size is None:
        batch_size = forward.auto_batch_size((3, image_size, image_size)) if dev.type == "cuda" else CPU_BATCH
    if compile:
        forward.compile(compile_backend)
    cfg.batch_size = batch_size
    inputs = bare_inputs(forward, batch_size, per_class)
    images = sum(len(x) for x in inputs)
    quiet = Console(quiet=True)
    runs: list[ExtractResult] = []  # the main pipeline's, for its streaming rate and model build

    def pipeline(n_workers: int | None, results: list[ExtractResult] | None = None) -> Callable[[], LeftOut]:
        """One `extract` run with `n_workers`, less its model build; its result appended to `results`, if given."""
        def run() -> LeftOut:
            out = Path(tempfile.mkdtemp(dir=work))
            result = extract(replace(cfg, out=out, workers=n_workers), quiet)
            if results is not None:
                results.append(result)
            shutil.rmtree(out)
            return LeftOut(result.build_s)
        return run

    def bare() -> None:
        for x in inputs:
            forward(x)
        sync(dev)

    bare()  # warm-up: allocator, kernel selection (the pipeline's own start-up costs are part of what it is timed for)
    measured = bracketed_ratios(bare, {"pipeline": pipeline(workers, runs)}, rounds)
    more = (bracketed_ratios(bare, {f"pipeline_{n}_workers": pipeline(n) for n in more_workers}, more_rounds or rounds)
            if more_workers else None)
    best = measured.fastest
    found = {
        "images": images,
        "batch_size": batch_size,
        "channels_last": forward.memory_format == torch.channels_last,
        "bare_img_s": round(images / best["baseline"], 2),
        "pipeline_img_s": round(images / best["pipeline"], 2),
        "streaming_img_s": round(max(r.images_per_s or 0.0 for r in runs), 2),
        "model_build_s": round(min(r.build_s for r in runs), 3),
        "round_ratios": [round(r, 3) for r in measured.rounds["pipeline"]],
        "ratio": measured.ratio("pipeline"),
    }
    if more is not None:
        for n in more_workers:
            found[f"pipeline_img_s_{n}_workers"] = round(images / more.fastest[f"pipeline_{n}_workers"], 2)
            found[f"round_ratios_{n}_workers"] = [round(r, 3) for r in more.rounds[f"pipeline_{n}_workers"]]
            found[f"ratio_{n}_workers"] = more.ratio(f"pipeline_{n}_workers")
    return found


def forward_rates(forwards: dict[str, BackboneForward], images: torch.Tensor, warmup: int, steps: int, rounds: int) -> dict[str, float]:
    """Images/s of each forward on one batch, as timm's benchmark times a model: `warmup` batches untimed (a compiled
    forward compiles in its first), then `steps` batches and a synchronize per timed stretch; the fastest of `rounds`
    rounds, the forwards alternating inside each (`fastest_rounds`)."""
    dev = images.device

    def timed(forward: BackboneForward) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps):
                forward(images)
            sync(dev)
        return run

    for forward in forwards.values():
        for _ in range(warmup):
            forward(images)
    sync(dev)
    best = fastest_rounds({name: timed(forward) for name, forward in forwards.items()}, rounds)
    return {name: steps * len(images) / seconds for name, seconds in best.items()}


def main(smoke: bool = False) -> dict:
    dev = device()
    models, image_size, per_class, rounds, more_rounds = ((SMOKE_MODELS, SMOKE_IMAGE_SIZE, SMOKE_PER_CLASS, 1, 1) if smoke
                                                          else (MODELS, IMAGE_SIZE, PER_CLASS, ROUNDS, WORKERS_ROUNDS))
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-extract-"))
    try:
        results = {name: compare(name, backbone, overrides, dev, work, image_size, per_class, rounds, more_workers=(WORKERS,),
                                   more_rounds=more_rounds)
                   for name, (backbone, overrides) in models.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {f"{name}_pipeline_over_bare": r.pop("ratio") for name, r in results.items()}
    targets = {k: at_least(TARGET) for k in ratios}
    ratios |= {f"{name}_pipeline_{WORKERS}_workers_over_bare": r.pop(f"ratio_{WORKERS}_workers") for name, r in results.items()}
    crossing = crossing_bytes(make_spec(image_size, (0.5,) * 3, (0.25,) * 3, "bicubic"))
    ratios["ipc_bytes_uint8_over_float32"] = crossing["after"] / crossing["before"]
    targets["ipc_bytes_uint8_over_float32"] = at_most(TARGET_BYTES)
    details = {"image_size": image_size, "rounds": rounds, "more_rounds": more_rounds, "workers": default_workers(dev), "more_workers": WORKERS, "bytes_per_image": crossing,
               "models": {k: f"{b} {o}" for k, (b, o) in models.items()}, **results}
    return record("extraction", ratios, targets, details, smoke)


if __name__ == "__main__":
    run_bench(main)
