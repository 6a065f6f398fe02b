"""`probe run`: find the cache, skip a run the ledger already holds, train, write the run folder and ledger row.

Read `run_probe` top to bottom; `probe sweep` reuses the same pieces for many configurations.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from cache.layout import backbone_folder
from cache.schema import CacheMeta, check_protocol
from cache.store import CacheReader
from common.errors import MedfmError
from common.locks import FileLock, acquire
from common.runtime import device_label, output_root, resolve_device
from ledger.predictions import Predictions
from ledger.records import RunRecord, cache_identity, config_key, late_best, late_best_note
from ledger.runs import RunConfig, new_run_dir, write_config, write_history
from ledger.store import Ledger
from probe.config import FitResult, TrainConfig
from probe.data import FeatureSource
from probe.folds import check_folds, fold_rows
from probe.heads import RANDOM_DEIT_WARNING, get_head
from probe.logreg import edge_note, fit_logreg
from probe.solvers import check_lbfgs, check_solver
from probe.subsets import subset_rows
from probe.train import train_head
from scoring.health import Health
from training.record import record_run
from training.tensorboard import add_epoch, scalar_writer

MAX_SEED = 2**32 - 1  # what every random generator the heads use takes (numpy's legacy seed is the narrowest)


def validate(config: TrainConfig) -> None:
    """Bad values are user errors, said before any work starts."""
    get_head(config.head)  # an unknown head names the registered ones
    check_protocol(config.protocol)
    check_solver(config.solver)
    if config.solver == "lbfgs":
        check_lbfgs(config.head, config.protocol, config.views, config.c_grid)
    if config.folds:
        check_folds(config.folds, config.fold)
    checks = [
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.views >= 0, f"--views must be auto, 0 (the eval view) or a number of augmented views, got {config.views}"),
        (0 < config.lr < math.inf, f"--lr must be a positive number, got {config.lr}"),
        (0 <= config.weight_decay < math.inf, f"--weight-decay must be a non-negative number, got {config.weight_decay}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.warmup_steps is None or config.warmup_steps >= 0, f"--warmup-steps must be non-negative, got {config.warmup_steps}"),
        (config.patience is None or config.patience >= 1, f"--patience must be at least 1, got {config.patience}"),
        (config.grad_clip is None or 0 < config.grad_clip < math.inf, f"--grad-clip must be a positive number (0: none), got {config.grad_clip}"),
        (0 <= config.seed <= MAX_SEED, f"a head seed (--seed, --seeds) must be a whole number from 0 to {MAX_SEED}, got {config.seed}"),
        (0 <= config.data_seed <= MAX_SEED, f"--data-seed must be a whole number from 0 to {MAX_SEED}, got {config.data_seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise MedfmError(message)


@dataclass
class RunOutcome:
    record: RunRecord
    skipped: bool  # True when the ledger already held this configuration


def scenario(head: str) -> str:
    """Heads on cached features of a frozen backbone: the study's frozen scenarios; the zeroshot head's is `zero-shot`."""
    return "zero-shot" if head == "zeroshot" else f"frozen-{head}"


def head_init(config: TrainConfig) -> str:
    """What the head starts from on this machine: "" (nothing pretrained), "random" (pretrained weights missing), or a file."""
    return get_head(config.head).init(**config.head_options())


def ledger_key(reader: CacheReader, config: TrainConfig) -> str:
    """Skip-if-done identity: the stage, the config, what the head starts from on this machine, the cache, the seed."""
    identity: dict[str, Any] = {"stage": "probe", **config.to_dict()}
    if init := head_init(config):
        identity["head_init"] = init
    if config.head == "zeroshot" and (text := reader.text_classes()) is not None:
        identity["text_sha256"] = text.sha256  # other prompts, another run (the cache's fingerprint stays)
    return config_key(identity, reader.fingerprint, config.seed)


def run_probe(
    reader: CacheReader, config: TrainConfig, *, device: str = "auto", max_ram: int | None = None, force: bool = False,
    ledger: Ledger | None = None, console: Console | None = None, calibrate: bool = False,
) -> RunOutcome:
    """Train one head from an open cache, unless the ledger already holds this exact run (`force` retrains).
    `config.solver` auto is resolved first (`TrainConfig.resolved`): the run and its ledger key are those of the solver used."""
    console = console or Console(stderr=True)
    ledger = ledger or Ledger()
    config = config.resolved()
    validate(config)
    key = ledger_key(reader, config)
    with claim(ledger, key):
        done = ledger.find(key)  # read under the claim: a twin process that finished first is not trained again
        if done is not None and not force:
            console.print(f"[green]already in the ledger[/] (run {done.id}, {done.run_dir}): {describe(done)}; skipping (--force retrains)")
            return RunOutcome(done, True)
        return _train(reader, config, key, ledger, device, max_ram, console, calibrate)


def claim(ledger: Ledger, key: str) -> FileLock:
    """The right to train the run `key`: a second process asking for the same run stops with one line."""
    return acquire(ledger.path.parent / "locks" / f"probe-{key[:16]}", f"the probe run {key[:8]}")


def _train(reader: CacheReader, config: TrainConfig, key: str, ledger: Ledger, device: str, max_ram: int | None,
           console: Console, calibrate: bool = False) -> RunOutcome:
    dev = resolve_device(device)
    rows = subset_rows(reader, config.train_subset) if config.train_subset is not None else None  # `probe curve`'s subsets
    fold = fold_rows(reader, config.folds, config.fold, config.fold_groups) if config.folds else None
    source = FeatureSource(reader, config.feature, config.batch_size, max_ram, config.views, rows=rows, fold=fold)
    console.print(f"training a {config.head} head{solver_text(config)} on {reader.meta.backbone.name}/{reader.meta.dataset.name} "
                  f"{config.feature} ({source.mode}, {source.nbytes / 2**20:.1f} MiB) on {dev}")
    warn_random(reader, config, console)
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_DEIT_WARNING)  # said once, above, on the console
        spec = get_head(config.head)
        if config.solver == "lbfgs":
            result = fit_logreg(config, source, reader.task, dev, progress)
        elif spec.trains:
            result = train_head(config, source, reader.task, dev, progress)
        else:  # a head with a fit of its own (the kNN probe, `probe.knn`): no training loop
            result = spec.fit(config, source, reader.task, dev, progress)
    record = save_run(reader, result, key, ledger, total_seconds=time.perf_counter() - started, device=device_label(dev),
                      calibrate=calibrate, ids={split: source.ids(split) for split in result.predictions})
    which = f"run {record.id}" if record.id is not None else "run (its ledger row pending)"
    console.print(f"{which}: {describe(record)} -> {record.run_dir}")  # the id `probe eval` and `probe compare` take
    if record.late_best:
        console.print(f"[yellow]{late_best_note(result.best_epoch, config.epochs, late_hint(config))}[/]")
    if config.solver == "lbfgs" and (note := edge_note(result)):
        console.print(f"[yellow]{note}[/]", highlight=False)
    if record.collapsed or record.chance:
        console.print(f"[yellow]warning: {result.extra['health']}[/]", highlight=False, soft_wrap=True)
    return RunOutcome(record, False)


def solver_text(config: TrainConfig) -> str:
    """How a resolved config's linear head is fit, for the run's first line ("" for other heads)."""
    if config.head != "linear":
        return ""
    if config.solver == "lbfgs":
        return (f" (logistic regression on standardized features, L-BFGS, C chosen on validation over "
                f"{min(config.c_grid):g}..{max(config.c_grid):g})")
    return " (AdamW, the study's recipe" + (", standardized features)" if config.standardize else ")")


def late_hint(config: TrainConfig) -> str:
    """What to try when a head's best epoch came late: more epochs, or standardized features for a linear head."""
    return "raise --epochs or use --standardize" if config.head == "linear" and not config.standardize else "raise --epochs"


def warn_random(reader: CacheReader, config: TrainConfig, console: Console) -> None:
    """Say loudly when the backbone's features or the head's pretrained part are untrained."""
    if reader.meta.backbone.random_weights:
        console.print(f"[bold red]WARNING: {reader.path.name} holds features of a RANDOMLY initialised "
                      f"{reader.meta.backbone.name}[/]; its scores say nothing about the pretrained model")
    if head_init(config) == "random" and config.head_weights != "random":
        console.print(f"[bold red]WARNING: {RANDOM_DEIT_WARNING}[/] (see `--head-weights`): the {config.head} head starts "
                      "from RANDOM weights, unlike the study")


def describe(record: RunRecord) -> str:
    """One line: backbone/dataset head, val and test scores, and what was RANDOM or late."""
    flags = [f"RANDOM {part} weights" for part, random in (("backbone", record.backbone_random), ("head", record.head_random)) if random]
    if record.late_best:
        flags.append("best epoch late")
    flag = f" [{', '.join(flags)}]" if flags else ""
    dataset = record.dataset_label or record.dataset
    return (f"{record.backbone}/{dataset} {record.head} head: val {record.primary_metric} {_score(record.val_score)}, "
            f"test {record.primary_metric} {_score(record.test_primary)}{flag}")


def _score(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def null_draw(meta: CacheMeta) -> dict[str, int]:
    """`{"backbone_seed": K}` for features of a null backbone (random weights, draw K >= 1), which the report sets apart
    as the null its cells must beat; {} otherwise, so other runs' configs are as they were."""
    seed = int(meta.backbone.weights.get("seed", 0) or 0)
    return {"backbone_seed": seed} if seed else {}


def _rows_per_s(reader: CacheReader, result: FitResult, train_ids: np.ndarray | None) -> float | None:
    """Train rows the head read per second of training: its epochs (an lbfgs fit: its evaluations of the objective over
    every C) x its train rows / its train seconds."""
    subset = result.config.train_subset
    rows = len(subset_rows(reader, subset)) if subset is not None else len(reader.ids("train") if train_ids is None else train_ids)
    passes = sum(row.get("evaluations", 1) for row in result.history)
    return passes * rows / result.train_seconds if result.train_seconds > 0 else None


def save_run(reader: CacheReader, result: FitResult, key: str, ledger: Ledger, total_seconds: float | None = None,
             device: str = "", shared: int = 1, calibrate: bool = False, health: Health | None = None,
             reliability: bool = True, ids: dict[str, np.ndarray] | None = None) -> RunRecord:
    """Write the run folder (config, history, best head, metrics) and append the ledger row.

    Single-label runs also get `reliability.png` (unless `reliability` is False: a sweep draws it for its best
    configuration only); `calibrate` fits a temperature on the validation logits and adds the test split's calibration
    metrics under it (`<name>_calibrated`, `scoring.calibration`). `health` is checked here unless given (a sweep checks
    its heads together, `scoring.health.check_runs`).

    Its cost: `total_seconds` / `shared` (heads trained together in one pass share it), on `device`; its throughput, train
    rows read per second of training; and the cache's whole extraction (seconds, device), counted once per cache by
    the report."""
    meta, config, task = reader.meta, result.config, reader.task
    backbone, dataset = meta.backbone.name, meta.dataset.name
    run_dir = new_run_dir(output_root() / "runs" / "probe",
                          f"{time.strftime('%Y%m%d-%H%M%S')}-{backbone_folder(backbone)}-{dataset}-{config.head}-{key[:8]}")
    write_config(run_dir, RunConfig(
        stage="probe", scenario=scenario(config.head), backbone=backbone, dataset=dataset, config=config.to_dict(),
        seed=config.seed, config_key=key, task=task.to_dict(), cache=str(reader.path), cache_fingerprint=reader.fingerprint,
        backbone_random_weights=meta.backbone.random_weights, head_init=result.head_init, extra={"precision": result.precision},
    ))
    write_history(run_dir, result.history)
    trains = get_head(config.head).trains and config.solver != "lbfgs"  # an epoch loop (an lbfgs fit's rows are C values)
    if trains:  # the same epochs where TensorBoard reads them
        with scalar_writer(run_dir) as writer:
            for row in result.history:
                add_epoch(writer, row["epoch"], row["train_loss"], task.primary_metric, row[f"val_{task.primary_metric}"], row["lr"])
    torch.save(result.state_dict, run_dir / "head.pt")
    late = trains and late_best(result.best_epoch, config.epochs)
    record = RunRecord(
        stage="probe", scenario=scenario(config.head), backbone=backbone, dataset=dataset, head=config.head,
        config={**config.to_dict(), "head_init": result.head_init, **null_draw(meta)}, config_key=key, cache_fingerprint=reader.fingerprint,
        seed=config.seed, primary_metric=task.primary_metric, val_score=result.val_score,
        test_metrics=result.test_metrics, test_primary=float(result.test_metrics[task.primary_metric]),
        backbone_random=meta.backbone.random_weights, head_random=result.head_init == "random", train_seconds=result.train_seconds,
        total_seconds=total_seconds, run_dir=str(run_dir), late_best=late, device=device,
        cost_seconds=total_seconds / max(shared, 1) if total_seconds is not None else None,
        throughput=_rows_per_s(reader, result, (ids or {}).get("train")), extract_seconds=meta.extract_seconds or None, extract_device=meta.extract_device,
    ).with_identity(cache_identity(meta))
    ids = ids or {split: reader.ids(split) for split in result.predictions}  # a fold's own rows (`FeatureSource.ids`)
    predictions = {split: Predictions(ids[split], labels, logits) for split, (labels, logits) in result.predictions.items()}
    summary = {"best_epoch": result.best_epoch, "late_best": late, **result.extra}
    record_run(ledger, record, task, predictions, summary, result.val_metrics, health=health, calibrate=calibrate,
               reliability=reliability)
    result.extra.update(summary)  # the health message and the temperature, as the run's metrics.json holds them
    return record
