"""End-to-end training of backbone + head: the unfrozen scenarios (and frozen ones on live images).

Read `finetune` top to bottom: set-up (data, model, the study's recipe, DDP), resume from the run's
checkpoint if asked, the epoch loop (train, validate, keep the best, checkpoint), then the test
split scored once with the best-validation weights and one row in the results ledger.

Exact resume: a checkpoint after every epoch holds model, optimizer, scheduler, scaler, best score
and best weights, and the history. Random state is not saved: each epoch's randomness is seeded at the
epoch's start, the shuffle order, dropout and loader workers from (seed, epoch, rank), and each image's
augmentation from (seed, epoch, image id) (`finetune.data.draw_epoch`, the draws of the cache's augmented
views), so a resumed epoch replays exactly on every rank, which saved states of rank 0 alone could not do.
Only rank 0 writes; every rank reads the checkpoint on resume, so a multi-node run needs a shared --out.
The checkpoint is read by the safe loader (`common.checkpoints`): a file that is not this run's checkpoint is one line.

With `--adapter` (LoRA, DoRA, IA3; `training.adapters`, docs/protocol.md §9) the backbone stays as loaded and only the
adapter and the head train; the checkpoint and best.pt keep only those (`FinetuneModel.saved_state`), the base being the
run's weights file or its seeded random start, rebuilt alike on every rank, resume and `probe predict`.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

from cache.fingerprint import manifest_hash
from cache.layout import backbone_folder
from cache.schema import Task, check_protocol
from common.checkpoints import load_torch_file
from common.errors import MedfmError
from common.locks import acquire
from common.progress import Pace
from common.runtime import device_label, output_root, resolve_device
from extract.backbones import create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, resolve_weights
from extract.datasets import DatasetSource, get_dataset
from extract.datasets.decode import DECODER_VERSION
from extract.image_cache import image_folder
from extract.inputs import check_image_size, check_input_settings, check_study_inputs, input_spec
from extract.transforms import Normalize, TransformSpec
from finetune import distributed
from finetune.data import check_images, draw_epoch, epoch_seed, find_pixels, make_loader
from finetune.distributed import World
from finetune.model import FinetuneModel, FreezePolicy, build_model, freeze_unused
from ledger.predictions import Predictions
from ledger.records import RunRecord, config_key, dataset_identity, late_best, late_best_note
from ledger.runs import METRICS, RunConfig, read_history, write_config, write_history, write_json
from ledger.store import Ledger
from scoring.metrics import compute_metrics, loss_fn, primary
from training.adapters import AdapterSpec, adapter_file, check_tensors, parse_adapter
from training.heads import get_head
from training.recipe import STUDY, Precision, improves, param_groups, precision, selection_rows, warmup_then_constant
from training.record import record_run
from training.tensorboard import add_epoch, scalar_writer

CHECKPOINT = "checkpoint.pt"
# Left out of a run's config: where and how fast, not what is trained, and the seed, which is a column of its own
# (the report averages a configuration over its seeds). The dataset root stays in: other images are another run.
NOT_IN_KEY = ("out", "device", "workers", "resume", "seed", "image_cache")


@dataclass
class FinetuneConfig:
    backbone: str
    dataset: str
    head: str = "linear"  # linear (pooled feature) | deit (tokens)
    freeze: str | None = None  # none | all | last-K; None: none, or all with an adapter
    adapter: str | None = None  # lora | dora | ia3, with options (`training.adapters.parse_adapter`); None: no adapter
    adapter_lr: float | None = None  # the adapter's learning rate; None: its recipe's (`training.recipe.ADAPTER_RECIPES`)
    root: Path | None = None
    weights: str = "default"  # default | random | auto (default, else random with a warning) | PATH
    epochs: int = STUDY.epochs
    batch_size: int = STUDY.batch_size  # the global batch, split evenly across DDP ranks
    lr: float = STUDY.lr
    weight_decay: float = STUDY.weight_decay
    warmup_steps: int | None = None  # None: the study's, STUDY.warmup_steps(steps per epoch)
    grad_clip: float = STUDY.grad_clip
    amp: bool | None = None  # None: on for CUDA; see training.recipe.precision
    amp_dtype: str = "auto"  # auto (bf16 where the GPU has it, else fp16) | bf16 | fp16 (with a GradScaler)
    augment: bool = True  # the study's train augmentation; off: the eval transform for training too
    protocol: str = "medfm"  # medfm | study: the official code's rules where they differ from ours (docs/protocol.md §7)
    patience: int | None = None  # stop after this many epochs without a better validation score
    image_size: int | None = None
    in_chans: int = 3
    norm: str = "model"  # as extract's --norm: model (the backbone's mean/std) | dataset (the train split's) | study
    interpolation: str = "model"  # as extract's --interpolation: model (the backbone's) | bilinear (the study's) | bicubic
    head_depth: int = 12
    head_preset: str = "deit-b"
    head_weights: str = "default"  # the DeiT head's blocks: default | random | PATH
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    image_cache: str = "auto"  # auto | off | DIR: read the images from an exact `extract images` cache (the same tensors)
    resume: bool = False
    out: Path = field(default_factory=lambda: output_root() / "runs")
    dataset_options: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone constructor overrides (tiny test models)


@dataclass
class FinetuneResult:
    run_dir: Path
    scenario: str
    best_epoch: int  # 1-based
    metric: str  # the dataset's primary metric
    val_score: float
    test_score: float
    test_metrics: dict[str, Any]
    history: list[dict[str, Any]]  # one entry per epoch: loss, train and val metrics, lr
    backbone_random: bool
    head_random: bool
    trained: bool  # False when the ledger already held this run
    ledger_id: int | None


def scenario_name(head: str, freeze: FreezePolicy, adapter: AdapterSpec | None = None) -> str:
    """The study's frozen-/unfrozen-<head>; partial unfreezing (`last-K`) is a scenario of its own, last<K>-<head>, and so
    is each adapter method, <method>-<head> (lora-linear)."""
    setting = {None: "unfrozen", 0: "frozen"}.get(freeze.trainable_blocks, f"last{freeze.trainable_blocks}")
    return f"{adapter.method if adapter else setting}-{head}"


def adapter_of(cfg: FinetuneConfig) -> AdapterSpec | None:
    return parse_adapter(cfg.adapter) if cfg.adapter else None


def finetune(cfg: FinetuneConfig, console: Console | None = None) -> FinetuneResult:
    """Train `cfg.backbone` + head on `cfg.dataset` end to end; under torchrun, one rank of a DDP run."""
    _validate(cfg)
    world = distributed.start(resolve_device(cfg.device))
    try:
        with ExitStack() as held:
            return _finetune(cfg, world, console or Console(stderr=True, quiet=not world.is_main), held)
    finally:
        distributed.stop(world)


@dataclass
class Run:
    """What identifies a run and where it lives: computed before any model is built."""

    source: DatasetSource
    weights: ResolvedWeights
    freeze: FreezePolicy
    adapter: AdapterSpec | None
    scenario: str
    config: dict[str, Any]  # what decides the result (the ledger row's config)
    key: str
    run_dir: Path


@dataclass
class Training:
    """The model, its data and the study's recipe, set up for the epoch loop."""

    model: FinetuneModel
    trained: nn.Module  # the model, or its DDP wrapper
    inputs: TransformSpec
    loaders: dict[str, DataLoader]
    sampler: Any  # the train loader's sampler (set_epoch)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    params: dict[str, int]  # trainable and total parameters, recorded beside the score
    normalize: Normalize = field(init=False)  # the loaders' uint8 crops -> the model's float input, on the device

    def __post_init__(self) -> None:
        self.normalize = Normalize(self.inputs)


def _finetune(cfg: FinetuneConfig, world: World, console: Console, held: ExitStack) -> FinetuneResult:
    start_time = time.perf_counter()
    if cfg.batch_size % world.size:
        raise MedfmError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world.size} processes")
    amp = precision(world.device, cfg.amp, cfg.amp_dtype, cfg.protocol)
    run = _identify(cfg, console)
    ledger = Ledger(Path(cfg.out) / "results.sqlite")
    if world.is_main:  # one process trains a run folder: a twin launch stops here, before touching it
        held.enter_context(acquire(run.run_dir / "run", f"the finetune run {run.run_dir}"))  # run_dir/run.lock
    if (done := ledger.find(run.key)) is not None:
        console.print(f"[green]already finished[/]: ledger row {done.id}, {run.run_dir}; nothing to train")
        return _finished_result(done, run.run_dir, run.scenario)
    checkpoint_path = run.run_dir / CHECKPOINT
    if checkpoint_path.exists() and not cfg.resume:
        raise MedfmError(f"{run.run_dir} holds an unfinished run of this configuration; pass --resume to continue it, "
                         f"or remove the folder to start over")
    setup = _set_up(cfg, run, world, amp, console)
    state = _resume_or_start(cfg, run, setup, world, amp, checkpoint_path, console)
    _train_epochs(cfg, run, setup, world, amp, state, checkpoint_path, console, held)
    return _finish(cfg, run, setup, world, state, ledger, start_time, console)


def _identify(cfg: FinetuneConfig, console: Console) -> Run:
    """The run's identity (its config, skip-if-done key and folder), from the settings and the data, before any model."""
    adapter = adapter_of(cfg)
    freeze = FreezePolicy.parse(cfg.freeze or ("all" if adapter else "none"))
    source = get_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    check_study_inputs(cfg.protocol, source, cfg.norm, cfg.interpolation, cfg.in_chans)
    weights = resolve_weights(get_spec(cfg.backbone), cfg.weights, warn=console.print)
    used = {f"head_{option}" for option in get_head(cfg.head).options}  # another head's settings do not change this run
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY and (not k.startswith("head_") or k in used)}
    if cfg.amp_dtype == "auto":
        config.pop("amp_dtype")  # the policy runs had before the option existed: their keys stay as they were
    config["freeze"] = freeze.text
    if adapter:
        config.update(adapter=adapter.to_dict(), adapter_lr=cfg.adapter_lr or adapter.lr)
    else:  # runs without one keep the keys they had
        del config["adapter"], config["adapter_lr"]
    config.update(root=str(Path(cfg.root).expanduser().resolve()) if cfg.root else None, weights=weights.identity,
                  dataset_options=source.options, manifest_hash=manifest_hash(source.manifest()), decoder=DECODER_VERSION)
    key = config_key({"stage": "finetune", **config}, None, cfg.seed)
    scenario = scenario_name(cfg.head, freeze, adapter)
    run_dir = Path(cfg.out) / "finetune" / f"{backbone_folder(cfg.backbone)}-{source.name}-{scenario}-{key[:12]}"
    return Run(source, weights, freeze, adapter, scenario, config, key, run_dir)


def _set_up(cfg: FinetuneConfig, run: Run, world: World, amp: Precision, console: Console) -> Training:
    """Backbone + head on the device, the split loaders, and the study's optimiser, schedule and loss."""
    device = world.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's peak, recorded beside its score
    torch.manual_seed(cfg.seed)  # the same initial weights (an adapter run's base too) on every rank and on every resume
    backbone = create_backbone(cfg.backbone, run.weights, image_size=cfg.image_size, in_chans=cfg.in_chans, protocol=cfg.protocol,
                               **cfg.overrides)
    check_image_size(backbone, cfg.backbone)
    head_options = {option: getattr(cfg, f"head_{option}") for option in get_head(cfg.head).options}
    task = run.source.task
    model = build_model(backbone.to(device), cfg.head, task.num_outputs, run.freeze, cfg.protocol, run.adapter, cfg.backbone,
                        **head_options).to(device)
    inputs, _ = input_spec(run.source, backbone.data_config, cfg.norm, cfg.in_chans, cfg.interpolation, cfg.workers)
    adapter_params = model.adapter_params
    unused = freeze_unused(model, torch.zeros(1, inputs.channels, inputs.size, inputs.size, device=device))
    if bypassed := [name for name in unused if name in adapter_params]:
        layer = max((t for t in model.backbone.attached_adapter.targets if bypassed[0].startswith(f"backbone.{t}.")), key=len)
        raise MedfmError(f"--adapter {cfg.adapter}: the adapter of {layer} gets no gradient: "
                         f"{cfg.backbone}'s forward does not run that layer (e.g. a MultiheadAttention reads its out_proj's weight); "
                         "choose other targets=")
    if unused:
        console.print(f"{len(unused)} parameter tensors get no gradient through the {cfg.head} head and stay fixed ({unused[0]}, ...)")
    pixels = find_pixels(run.source, cfg.root, inputs, cfg.image_cache)
    if pixels is not None:
        console.print(f"reading the images from the image cache {pixels.path}")
    loader_args = {"batch_size": cfg.batch_size, "seed": cfg.seed, "workers": cfg.workers, "augment": cfg.augment, "pixels": pixels}
    loaders, sampler = {}, None
    for split in ("train", "val", "test"):
        loaders[split], split_sampler = make_loader(run.source, split, inputs, world, train=split == "train", **loader_args)
        sampler = split_sampler if split == "train" else sampler
    warmup = STUDY.warmup_steps(len(loaders["train"])) if cfg.warmup_steps is None else cfg.warmup_steps
    own_lr = dict.fromkeys(adapter_params, run.config["adapter_lr"]) if run.adapter else {}  # the head keeps --lr
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, own_lr), lr=cfg.lr)
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world.distributed else model
    params = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in model.parameters())}
    if run.adapter:
        console.print(f"{run.adapter.method} in {len(model.backbone.attached_adapter.targets)} layers of {cfg.backbone}: "
                      f"{params['trainable_params']:,} of {params['total_params']:,} parameters train (adapter and head)")
    return Training(model, trained, inputs, loaders, sampler, optimizer, warmup_then_constant(optimizer, warmup),
                    torch.amp.GradScaler(device.type, enabled=amp.needs_scaler), loss_fn(task), params)


def _resume_or_start(cfg: FinetuneConfig, run: Run, setup: Training, world: World, amp: Precision, checkpoint_path: Path,
                     console: Console) -> dict[str, Any]:
    """The loop's state: from the run's checkpoint with --resume, else fresh, with the run folder started (rank 0)."""
    state: dict[str, Any] = {"epoch": 0, "best_score": None, "best_epoch": None, "best_model": None, "best_val": None, "history": [],
                             "train_seconds": 0.0}
    if cfg.resume and checkpoint_path.exists():
        state = _read_checkpoint(checkpoint_path, setup)
        console.print(f"resuming {run.run_dir} after epoch {state['epoch']}/{cfg.epochs}")
    elif world.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        head_init = get_head(cfg.head).init(**{o: getattr(cfg, f"head_{o}") for o in get_head(cfg.head).options})
        write_config(run.run_dir, RunConfig(
            stage="finetune", scenario=run.scenario, backbone=cfg.backbone, dataset=cfg.dataset, config=run.config, seed=cfg.seed,
            config_key=run.key, task=run.source.task.to_dict(), backbone_random_weights=run.weights.random, head_init=head_init,
            extra={"freeze": run.freeze.text, "precision": amp.describe(), **setup.params,
                   **({"adapter_layers": list(setup.model.backbone.attached_adapter.targets)} if run.adapter else {})},
        ))
        write_json(run.run_dir / "splits.json", run.source.manifest())
        console.print(f"finetuning {cfg.backbone} + {cfg.head} head ({run.scenario}, --freeze {run.freeze.text}) on {run.source.name} -> {run.run_dir}")
    return state


CHECKPOINT_PARTS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "best_epoch", "best_model", "best_val",
                    "history", "train_seconds")


def _read_checkpoint(path: Path, setup: Training) -> dict[str, Any]:
    """The run's checkpoint, read by the safe loader and loaded into the model, optimizer, scheduler and scaler; the loop's
    state is returned. A file that is not this run's checkpoint (other bytes, pickled code, another model's tensors, an
    empty file) is one line naming it and what to do, before anything of it is used."""
    fix = f"remove {path} and rerun to start the run over"
    state = load_torch_file(path, fix)
    missing = [part for part in CHECKPOINT_PARTS if part not in state] if isinstance(state, dict) else list(CHECKPOINT_PARTS)
    if missing:
        raise MedfmError(f"{path} holds no finetune checkpoint (it lacks {', '.join(missing[:3])}); {fix}")
    keys = set(setup.model.saved_state())
    for part in ("model", "best_model"):
        check_tensors(setup.model, state[part], keys, path, fix)
    setup.model.load_state_dict(state.pop("model"), strict=False)
    for part in ("optimizer", "scheduler", "scaler"):
        try:
            getattr(setup, part).load_state_dict(state.pop(part))
        except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
            said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MedfmError(f"{path} holds another run's {part} state ({said}); {fix}") from None
    return state


def _train_epochs(cfg: FinetuneConfig, run: Run, setup: Training, world: World, amp: Precision, state: dict[str, Any],
                  checkpoint_path: Path, console: Console, held: ExitStack) -> None:
    """Train, validate, keep the best, checkpoint: one epoch at a time, from the state's epoch to the last."""
    task = run.source.task
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)
    steps = len(setup.loaders["train"])
    pace = Pace(console, f"finetuning {cfg.backbone} ({run.scenario})", (cfg.epochs - state["epoch"]) * steps)
    scalars = _scalars(run.run_dir, state, task, held) if world.is_main else None
    first_epoch = state["epoch"]
    with progress:
        bar = progress.add_task("epoch", total=steps)
        for epoch in range(state["epoch"], cfg.epochs):
            if _patience_spent(state, cfg.patience):
                console.print(f"no better validation score for {cfg.patience} epochs: stopping early")
                break
            epoch_start = time.perf_counter()
            progress.reset(bar, description=f"epoch {epoch + 1}/{cfg.epochs}")

            def stepped(step: int, epoch: int = epoch) -> None:
                progress.advance(bar)
                pace.step((epoch - first_epoch) * steps + step, f"epoch {epoch + 1}/{cfg.epochs}")

            losses, train_labels, train_logits = _train_one_epoch(cfg, setup, world, amp, epoch, stepped)
            val_labels, val_logits = distributed.gather_predictions(world, *_predict(setup.model, setup.loaders["val"], setup.normalize, world.device, amp.dtype))
            state["train_seconds"] += time.perf_counter() - epoch_start
            val_metrics = compute_metrics(task, val_labels, val_logits)
            chosen = selection_rows(len(val_labels), cfg.seed, epoch + 1, cfg.protocol)  # the study's: a draw of 64s
            score = primary(task, val_metrics if chosen is None else compute_metrics(task, val_labels[chosen], val_logits[chosen]))
            if improves(score, state["best_score"], cfg.protocol):
                state.update(best_score=score, best_epoch=epoch + 1, best_val=(torch.from_numpy(val_labels), torch.from_numpy(val_logits)),  # tensors: checkpoints load weights-only
                             best_model={k: v.detach().cpu().clone() for k, v in setup.model.saved_state().items()})
            state["history"].append({
                "epoch": epoch + 1, "loss": distributed.all_mean(world, losses), "lr": setup.scheduler.get_last_lr()[0],
                "train": compute_metrics(task, train_labels, train_logits), "val": val_metrics, "seconds": time.perf_counter() - epoch_start,
            })
            state["epoch"] = epoch + 1
            if scalars is not None:
                add_epoch(scalars, epoch + 1, state["history"][-1]["loss"], task.primary_metric, score, state["history"][-1]["lr"])
                scalars.flush()  # visible in TensorBoard as the epoch ends
            if world.is_main:
                _atomic_save({"model": setup.model.saved_state(), "optimizer": setup.optimizer.state_dict(),
                             "scheduler": setup.scheduler.state_dict(), "scaler": setup.scaler.state_dict(), **state}, checkpoint_path)
            name = task.primary_metric
            console.print(f"epoch {epoch + 1}/{cfg.epochs}  loss {state['history'][-1]['loss']:.4f}  "
                          f"train {name} {primary(task, state['history'][-1]['train']):.4f}  val {name} {score:.4f}"
                          + ("  [green](best)[/]" if state["best_epoch"] == epoch + 1 else ""))


def _scalars(run_dir: Path, state: dict[str, Any], task: Task, held: ExitStack) -> SummaryWriter:
    """TensorBoard, one point per epoch, in one file: a resumed run rewrites the checkpoint's epochs and drops the killed
    attempt's file, whose points past the checkpoint were never kept."""
    for stale in run_dir.glob("events.out.tfevents.*"):
        stale.unlink()
    scalars = held.enter_context(scalar_writer(run_dir))
    for row in state["history"]:
        add_epoch(scalars, row["epoch"], row["loss"], task.primary_metric, primary(task, row["val"]), row["lr"])
    return scalars


def _train_one_epoch(cfg: FinetuneConfig, setup: Training, world: World, amp: Precision, epoch: int,
                     stepped: Callable[[int], Any]) -> tuple[float, np.ndarray, np.ndarray]:
    """One pass over this rank's share of the train split; the epoch's mean loss and the train predictions of every rank.
    The epoch's randomness is seeded from (seed, epoch, rank) and each image's augmentation from (seed, epoch, id)."""
    device = world.device
    _seed_everything(epoch_seed(cfg.seed, epoch, world.rank))
    setup.sampler.set_epoch(epoch)
    draw_epoch(setup.loaders["train"], cfg.seed, epoch)
    setup.trained.train()
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    losses, outputs = [], []  # kept on the device: no host sync per step
    for images, labels, index, ok, errors in setup.loaders["train"]:
        check_images(ok, errors)
        images, labels = setup.normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.dtype is not None):
            logits = setup.trained(images)
            loss = setup.criterion(logits.float(), labels)
        setup.scaler.scale(loss).backward()
        setup.scaler.unscale_(setup.optimizer)
        nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        setup.scaler.step(setup.optimizer)
        setup.scaler.update()
        setup.optimizer.zero_grad(set_to_none=True)
        setup.scheduler.step()
        losses.append(loss.detach())
        outputs.append((index, labels, logits.detach().float()))
        stepped(len(losses))
    labels, logits = distributed.gather_predictions(world, *map(torch.cat, zip(*outputs, strict=True)))
    return torch.stack(losses).mean().item(), labels, logits


def _finish(cfg: FinetuneConfig, run: Run, setup: Training, world: World, state: dict[str, Any], ledger: Ledger,
            start_time: float, console: Console) -> FinetuneResult:
    """The test split, once, with the best-validation weights, in fp32 (as the study); then (rank 0) the run's files and
    ledger row through the recorder both stages share (`training.record`)."""
    task, model = run.source.task, setup.model
    model.load_state_dict(state["best_model"], strict=not run.adapter)  # an adapter run's: the adapter and the head
    test_labels, test_logits = distributed.gather_predictions(world, *_predict(model, setup.loaders["test"], setup.normalize, world.device, None))
    test_metrics = compute_metrics(task, test_labels, test_logits)
    head_random = bool(getattr(model.head, "random_init", False))  # a DeiT head without its ImageNet weights is not the study's
    result = FinetuneResult(run.run_dir, run.scenario, state["best_epoch"], task.primary_metric, state["best_score"],
                            primary(task, test_metrics), test_metrics, state["history"], run.weights.random, head_random, True, None)
    if world.is_main:
        _atomic_save(adapter_file(model, state["best_model"]) if run.adapter else state["best_model"], run.run_dir / "best.pt")
        write_history(run.run_dir, state["history"])
        splits = run.source.splits
        predictions = {"val": Predictions(splits["val"].ids, *map(np.asarray, state["best_val"])),
                       "test": Predictions(splits["test"].ids, np.asarray(test_labels), np.asarray(test_logits))}
        cost = Cost(device_label(world.device) + (f" x{world.size}" if world.size > 1 else ""), world.size,
                    len(splits["train"]) * len(state["history"]))
        record = _record(cfg, run, result, state["train_seconds"], time.perf_counter() - start_time, setup.inputs, cost)
        late = late_best(result.best_epoch, cfg.epochs)
        # the cost beside the score, in metrics.json: not among the test metrics, which two equal runs must share
        summary: dict[str, Any] = {"best_epoch": result.best_epoch, "late_best": late, **setup.params, **_peak_memory(world.device)}
        record_run(ledger, record, task, predictions, summary, state["history"][result.best_epoch - 1]["val"])
        result.ledger_id = record.id
        (run.run_dir / CHECKPOINT).unlink(missing_ok=True)
        for problem in test_metrics.get("warnings", []):
            console.print(f"[yellow]warning[/]: {problem}")
        row = f"ledger row {result.ledger_id}" if result.ledger_id is not None else "its ledger row pending (the ledger was locked)"
        console.print(f"[green]done[/]: {row}, {run.run_dir}")
        if late:
            console.print(f"[yellow]{late_best_note(result.best_epoch, cfg.epochs)}[/]")
        if record.collapsed or record.chance:
            console.print(f"[yellow]warning: {summary['health']}[/]", highlight=False, soft_wrap=True)
    distributed.barrier(world)
    return result


def _validate(cfg: FinetuneConfig) -> None:
    get_head(cfg.head)  # an unknown head names the registered ones
    check_protocol(cfg.protocol)
    if adapter_of(cfg) is not None and cfg.freeze not in (None, "all"):
        raise MedfmError(f"--adapter trains the adapter and the head on a frozen backbone; --freeze {cfg.freeze} cannot go with it "
                         "(leave --freeze out)")
    if cfg.adapter_lr is not None and not cfg.adapter:
        raise MedfmError("--adapter-lr is the learning rate of an adapter's parameters: it goes with --adapter (the head's is --lr)")
    if cfg.adapter_lr is not None and not 0 < cfg.adapter_lr < math.inf:
        raise MedfmError(f"--adapter-lr must be a positive number, got {cfg.adapter_lr}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise MedfmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name, value, low_ok in (("lr", cfg.lr, False), ("grad-clip", cfg.grad_clip, False), ("weight-decay", cfg.weight_decay, True)):
        if not (0 <= value < math.inf if low_ok else 0 < value < math.inf):
            raise MedfmError(f"--{name} must be a {'non-negative' if low_ok else 'positive'} number, got {value}")
    if cfg.patience is not None and cfg.patience < 1:
        raise MedfmError(f"--patience must be at least 1, got {cfg.patience}")
    check_input_settings(cfg.norm, cfg.in_chans, cfg.image_size, cfg.interpolation)
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise MedfmError(f"--warmup-steps must not be negative, got {cfg.warmup_steps}")
    if cfg.workers is not None and cfg.workers < 0:
        raise MedfmError(f"--workers must be 0 (decode in the main process) or more, got {cfg.workers}")
    image_folder(cfg.image_cache)  # a mistyped --image-cache is one line before the model loads


def _peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory in MiB: on a GPU what torch allocated there during the run; on the CPU the process's
    peak resident size, data loading included."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_of": "cuda allocated"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "peak_memory_of": "process RSS"}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _patience_spent(state: dict[str, Any], patience: int | None) -> bool:
    return patience is not None and state["best_epoch"] is not None and state["epoch"] - state["best_epoch"] >= patience


@torch.no_grad()
def _predict(model: nn.Module, loader: DataLoader, normalize: Normalize, device: torch.device,
             amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """(dataset index, labels, logits) of this rank's share of a split, in eval mode; the loader's uint8 crops are
    normalised on the device."""
    model.eval()
    outputs = []
    for images, labels, index, ok, errors in loader:
        check_images(ok, errors)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(normalize(images.to(device, non_blocking=True)))
        outputs.append((index, labels, logits.float().cpu()))
    return tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))


def _atomic_save(obj: Any, path: Path) -> None:
    """Write next to the final name, then rename: a crash leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _record(cfg: FinetuneConfig, run: Run, result: FinetuneResult, train_seconds: float, total_seconds: float,
            inputs: TransformSpec, cost: Cost) -> RunRecord:
    """The run's ledger row; its dataset identity is the one a cache of the same data and inputs records. Its cost: the
    wall seconds of this call times its devices (a resumed run: this call's part), and train images per second."""
    identity = dataset_identity(
        cfg.dataset, root=run.config["root"], manifest_hash=run.config["manifest_hash"], options=run.config["dataset_options"],
        image_size=inputs.size, channels=inputs.channels, norm=cfg.norm, interpolation=inputs.interpolation,
    )
    return RunRecord(
        stage="finetune", scenario=run.scenario, backbone=cfg.backbone, dataset=cfg.dataset, head=cfg.head,
        config=run.config, config_key=run.key, cache_fingerprint=None, seed=cfg.seed,
        primary_metric=result.metric, val_score=result.val_score, test_metrics=result.test_metrics,
        test_primary=result.test_score, backbone_random=result.backbone_random, head_random=result.head_random,
        train_seconds=train_seconds, total_seconds=total_seconds, run_dir=str(result.run_dir),
        late_best=late_best(result.best_epoch, cfg.epochs), device=cost.device, cost_seconds=total_seconds * cost.devices,
        throughput=cost.images / train_seconds if train_seconds > 0 and cost.images else None,
    ).with_identity(identity)


@dataclass(frozen=True)
class Cost:
    """What a finetune ran on: the device label, how many devices, the train images it went through."""

    device: str = ""
    devices: int = 1
    images: int = 0


def _finished_result(record: RunRecord, run_dir: Path, scenario: str) -> FinetuneResult:
    metrics = json.loads((run_dir / METRICS).read_text()) if (run_dir / METRICS).is_file() else {}
    return FinetuneResult(run_dir, scenario, int(metrics.get("best_epoch", 0)), record.primary_metric, record.val_score,
                          record.test_primary, record.test_metrics, read_history(run_dir), record.backbone_random,
                          record.head_random, False, record.id)
