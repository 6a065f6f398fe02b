"""`finetune run`: train backbone + head end to end. Parsing only; the work is in finetune.train.

One device: `finetune run --backbone seem --dataset demo --head linear`.
Adapters: `finetune run --backbone dinov2 --dataset demo --adapter lora[:r=8,alpha=16,dropout=0.1,targets=qkv+proj]`.
Many: `torchrun --nproc_per_node N $(which finetune) run ...` (DDP; --batch-size stays the global batch).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from common.cli import dataset_options, parse_overrides, run_cli
from common.errors import MedfmError
from common.runtime import output_root, torchrun_launch
from extract.names import check_backbone, check_dataset, check_root
from training.adapters import parse_adapter
from training.names import check_head
from training.recipe import ADAPTER_RECIPES, STUDY

app = typer.Typer(help="Train a backbone and a head end to end (the study's unfrozen scenarios).", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def commands() -> None:
    """Train a backbone and a head end to end (the study's unfrozen scenarios)."""


@app.command()
def run(
    backbone: Annotated[str, typer.Option(help="Backbone name (see `extract backbones`).")],
    dataset: Annotated[str, typer.Option(help="Dataset name (see `extract datasets`).")],
    head: Annotated[str, typer.Option(help="linear (on the pooled feature) | deit (DeiT blocks on the tokens).")] = "linear",
    freeze: Annotated[str | None, typer.Option(help="none (all trains) | all (head only) | last-K (head + last K blocks).",
                                               show_default="none; all with --adapter")] = None,
    adapter: Annotated[str | None, typer.Option(help="Train an adapter in the frozen backbone, and the head: lora | dora | ia3, with "
                                                     "options as lora:r=8,alpha=16,dropout=0.1,targets=qkv+proj (docs/protocol.md §9).",
                                                show_default="none")] = None,
    adapter_lr: Annotated[float | None, typer.Option(help="The adapter's learning rate (the head's is --lr).", show_default=(
        ", ".join(f"{m} {r.lr:g}" for m, r in ADAPTER_RECIPES.items())))] = None,
    root: Annotated[Path | None, typer.Option(help="Folder holding the dataset's released layout.", show_default="none (demo needs none)")] = None,
    weights: Annotated[str, typer.Option(help="default | random | auto (default, else random, loudly) | PATH.")] = "default",
    epochs: Annotated[int, typer.Option(help="Training epochs (the study's).")] = STUDY.epochs,
    batch_size: Annotated[int, typer.Option(help="Global batch size, split across DDP processes (the study's).")] = STUDY.batch_size,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = STUDY.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (none on biases and norms).")] = STUDY.weight_decay,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.", show_default=(
        f"the study's, {STUDY.warmup_epochs} epochs but at most {STUDY.warmup_max_steps} steps"))] = None,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clipping.")] = STUDY.grad_clip,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision for training and validation (bf16, or fp16 with a "
                                                                     "loss scaler where the GPU lacks bf16); test in fp32.", show_default="on for CUDA")] = None,
    amp_dtype: Annotated[str, typer.Option(help="Mixed precision's type: auto (bf16 where the GPU has it, else fp16) | bf16 | fp16 "
                                                "(with a loss scaler, as the study trained).")] = "auto",
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="The study's train augmentation, image i of epoch e drawn "
                                                                        "from (--seed, e, its id): the draws of extract's view e.")] = True,
    protocol: Annotated[str, typer.Option(help="medfm | study: the official code's rules where they differ from ours (docs/protocol.md §7); "
                                               "study needs the study's inputs (--norm study --interpolation bilinear).")] = "medfm",
    patience: Annotated[int | None, typer.Option(help="Stop after N epochs without a better val score.", show_default="never")] = None,
    resume: Annotated[bool, typer.Option(help="Continue this configuration's unfinished run from its last checkpoint.")] = False,
    image_size: Annotated[int | None, typer.Option(help="Input size.", show_default="the backbone's, 224")] = None,
    in_chans: Annotated[int, typer.Option(help="1 rebuilds the first conv for grayscale (the study's R-channel init).")] = 3,
    norm: Annotated[str, typer.Option(help="model (the backbone's mean/std) | dataset (computed from the train split) | study (the study's fixed per-dataset constants).")] = "model",
    interpolation: Annotated[str, typer.Option(help="Resize mode: model (the backbone's, mostly bicubic) | bilinear (the study's) | bicubic.")] = "model",
    head_depth: Annotated[int, typer.Option(help="DeiT head blocks (the study: 12).")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b (the study) | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head blocks: default | random | PATH.")] = "default",
    seed: Annotated[int | None, typer.Option(help="Training seed (initial head, shuffle order, augmentation).", show_default="0")] = None,
    seeds: Annotated[str | None, typer.Option(help="Several seeds, comma-separated (0,1,2): one run each, one after another, each its "
                                                   "own ledger row; the report averages them.", show_default="none, --seed alone")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (under torchrun: each rank's LOCAL_RANK GPU).")] = "auto",
    workers: Annotated[int | None, typer.Option(help="DataLoader workers per process.", show_default="from the cores")] = None,
    image_cache: Annotated[str, typer.Option(help="auto: read the images from a matching exact image cache (`extract images`) under "
                                                  "$MEDFM_OUTPUT/images | off: decode the files | DIR: image caches there.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Runs folder and ledger.", show_default="$MEDFM_OUTPUT/runs")] = None,
    split_seed: Annotated[int | None, typer.Option(help="Seed of the split for datasets without fixed splits.",
                                                   show_default="the dataset's own (see `extract datasets`)")] = None,
    opt: Annotated[list[str] | None, typer.Option(help="Dataset option KEY=VALUE (repeatable).", show_default="none")] = None,
    override: Annotated[list[str] | None, typer.Option(
        help="Backbone constructor KEY=VALUE (repeatable); for tiny test models, e.g. embed_dim=32.", hidden=True)] = None,
) -> None:
    """Train BACKBONE + HEAD on DATASET end to end; the result joins the ledger that `probe report` reads."""
    check_backbone(backbone)  # a typo is one line before torch and the models load
    check_dataset(dataset)
    check_root(dataset, root)
    check_head(head, module=True)
    if adapter is not None:
        parse_adapter(adapter)  # a bad option is one line before torch loads
    several = _seeds(seeds, seed)
    from finetune.train import FinetuneConfig, finetune  # torch and the models: imported for a run, not for --help

    cfg = FinetuneConfig(
        backbone=backbone, dataset=dataset, head=head, freeze=freeze, adapter=adapter, adapter_lr=adapter_lr, root=root, weights=weights, epochs=epochs,
        batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip, amp=amp, amp_dtype=amp_dtype,
        augment=augment, protocol=protocol, patience=patience, image_size=image_size, in_chans=in_chans, norm=norm, interpolation=interpolation, head_depth=head_depth,
        head_preset=head_preset, head_weights=head_weights, seed=several[0], device=device, workers=workers, image_cache=image_cache, resume=resume,
        out=out or output_root() / "runs", dataset_options=dataset_options(opt, split_seed), overrides=parse_overrides(override or []),
    )
    tests = []
    for one in several:
        result = finetune(replace(cfg, seed=one))
        tests.append(result.test_score)
        if torchrun_launch().is_main:
            Console().print(f"{backbone} {result.scenario} on {dataset}{f' (seed {one})' if seeds else ''}: val {result.metric} "
                            f"{result.val_score:.4f} (epoch {result.best_epoch}), test {result.metric} {result.test_score:.4f}")
    if len(several) > 1 and torchrun_launch().is_main:
        finite = [t for t in tests if math.isfinite(t)]
        spread = f" ± {statistics.stdev(finite):.4f} (std over seeds)" if len(finite) > 1 else ""
        Console().print(f"mean over {len(several)} seeds ({', '.join(map(str, several))}): test {result.metric} "
                        f"{statistics.fmean(finite) if finite else math.nan:.4f}{spread}")


def _seeds(seeds: str | None, seed: int | None) -> list[int]:
    """The seeds to run: `--seeds 0,1,2` (a seed given twice runs once), else `--seed` (0 by default)."""
    if seeds is None:
        return [0 if seed is None else seed]
    if seed is not None:
        raise MedfmError("give --seed or --seeds, not both")
    try:
        values = [int(v.strip()) for v in seeds.split(",") if v.strip()]
    except ValueError:
        raise MedfmError(f"--seeds takes comma-separated integers such as 0,1,2, got '{seeds}'") from None
    if not values:
        raise MedfmError("--seeds needs at least one seed, e.g. 0,1,2")
    return list(dict.fromkeys(values))


def main() -> None:
    run_cli(app, "finetune", interrupted="interrupted; the run's checkpoint keeps every finished epoch: rerun the same "
                                         "`finetune run` with --resume to continue from there")
