"""`probe sweep`: many heads over one cache, lr x weight decay x head x seed (x layer).

All linear heads that share a feature array and schedule train together, as one batched computation
over one pass of the data per epoch (DINOv2's linear evaluation does the same). DeiT heads train one
after another by default; `deit_per_pass` > 1 trains that many side by side over one read of the
tokens, which pays when the token cache streams from disk and the device has room for their
activations. A configuration with a `train_subset` (`probe curve`) trains on those train rows alone (heads of one
subset share their passes). Configurations already in the ledger are skipped, so rerunning a finished sweep trains
nothing. The sweep's answer is the best configuration by mean validation score over its seeds, reported with
its mean test score: the rule of `probe report` (`ledger.store.best_configuration`).

Linear heads of `--solver lbfgs` (the default under medfm's protocol, `probe.solvers`) choose their own L2 strength on
validation: a learning-rate or weight-decay grid does not apply to them (configurations that differ only there are one
run), and each remaining configuration (seed, layer, subset) is fit on its own by `probe.logreg.fit_logreg`.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from cache.store import CacheReader
from common.errors import MedfmError
from common.runtime import device_label, resolve_device
from ledger.predictions import FILE as PREDICTIONS
from ledger.predictions import load_predictions
from ledger.records import RunRecord, best_configuration, mean_score
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.data import FeatureSource, feature_name
from probe.heads import RANDOM_DEIT_WARNING, get_head
from probe.logreg import edge_note, fit_logreg
from probe.run import claim, ledger_key, save_run, validate, warn_random
from probe.subsets import subset_rows
from probe.train import fit, make_head, small_on_one_thread
from scoring.calibration import reliability_diagram
from scoring.health import check_runs
from training.recipe import STUDY, precision
from training.record import RELIABILITY

AUTO = "auto"  # --deit-per-pass auto: as many DeiT heads per pass as the device's memory holds (`heads_per_pass`)


@dataclass(frozen=True)
class Grid:
    """The swept values; every combination is one configuration."""

    heads: tuple[str, ...] = ("linear",)
    lrs: tuple[float, ...] = (STUDY.lr,)
    weight_decays: tuple[float, ...] = (STUDY.weight_decay,)
    seeds: tuple[int, ...] = (0,)
    layers: tuple[int | None, ...] = (None,)  # None: the last block


@dataclass
class SweepOutcome:
    records: list[RunRecord]  # one per configuration and seed, in grid order (trained now or found in the ledger)
    best: RunRecord | None  # a run of the best configuration (the first of its seeds)
    trained: int
    skipped: int
    train_passes: int  # passes over train features, all groups together
    best_runs: list[RunRecord] = field(default_factory=list)  # every seed of the best configuration by mean validation

    @property
    def best_val(self) -> float:
        return mean_score([r.val_score for r in self.best_runs])

    @property
    def best_test(self) -> float:
        return mean_score([r.test_primary for r in self.best_runs])


def expand(reader: CacheReader, grid: Grid, base: TrainConfig) -> list[TrainConfig]:
    """Every configuration of the grid, on top of the shared settings in `base`; a head without a training loop
    (`--head knn`, deterministic, no learning rate or seed) is refused in one line."""
    for head in grid.heads:
        if not get_head(head).trains:
            raise MedfmError(f"--head {head} has nothing to sweep (no learning rate, weight decay or seed): run it once with `probe run --head {head}`")
    configs = (
        replace(base, head=head, feature=feature_name(reader, get_head(head).reads, layer), lr=lr, weight_decay=wd, seed=seed)
        for layer, head, lr, wd, seed in itertools.product(grid.layers, grid.heads, grid.lrs, grid.weight_decays, grid.seeds)
    )
    return list(dict.fromkeys(configs))  # a value given twice is one configuration


def run_sweep(
    reader: CacheReader, configs: list[TrainConfig], *, device: str = "auto", max_ram: int | None = None, force: bool = False,
    deit_per_pass: int | str = 1, ledger: Ledger | None = None, console: Console | None = None,
) -> SweepOutcome:
    """Train the configurations not yet in the ledger (all of them with `force`) and pick the best by validation."""
    # --- set-up: what is already done, and how the rest groups into passes over the data
    console = console or Console(stderr=True)
    ledger = ledger or Ledger()
    configs = [c.resolved() for c in configs]  # `--solver auto` made concrete: the runs and keys of the solver used
    for config in configs:
        validate(config)
    if deit_per_pass != AUTO and (not isinstance(deit_per_pass, int) or deit_per_pass < 1):
        raise MedfmError(f"--deit-per-pass must be auto or at least 1, got {deit_per_pass}")
    if len({(c.lr, c.weight_decay) for c in configs if c.solver == "lbfgs"}) > 1:
        console.print("linear heads are fit by L-BFGS (--solver lbfgs), their L2 strength chosen on validation: the --lr and "
                      "--weight-decay grid does not apply to them (--solver adamw sweeps it)")
    firsts: dict[str, TrainConfig] = {}
    for config in configs:  # configurations that differ only in what their solver ignores are one run
        firsts.setdefault(ledger_key(reader, config), config)
    keys, configs = list(firsts), list(firsts.values())
    with ExitStack() as claims:
        todo = [(c, k) for c, k in zip(configs, keys, strict=True) if force or ledger.find(k) is None]
        for _, key in todo:  # every run to train is ours alone, or the sweep stops before training any
            claims.enter_context(claim(ledger, key))
        todo = [(c, k) for c, k in todo if force or ledger.find(k) is None]  # read again, under the claims
        passes, saved = _train_todo(reader, configs, todo, device, max_ram, deit_per_pass, ledger, console)

    # --- the answer: every configuration's row (a row kept pending while the ledger was locked: as trained), and the
    # configuration with the best mean validation over its seeds
    records = [r for r in (ledger.find(k) or saved.get(k) for k in keys) if r is not None]
    best_runs = best_configuration(records)
    if not math.isfinite(mean_score([r.val_score for r in best_runs])):
        best_runs = []  # no configuration has a validation score
    if reader.task.kind != "multilabel":
        for run in best_runs:
            draw_reliability(run)
    return SweepOutcome(records, best_runs[0] if best_runs else None, len(todo), len(configs) - len(todo), passes, best_runs)


def _train_todo(
    reader: CacheReader, configs: list[TrainConfig], todo: list[tuple[TrainConfig, str]], device: str, max_ram: int | None,
    deit_per_pass: int | str, ledger: Ledger, console: Console,
) -> tuple[int, dict[str, RunRecord]]:
    """Train the configurations of `todo`, grouped into passes over the features; the number of train passes, and the
    record of each run trained, by its key."""
    console.print(f"sweep of {len(configs)} configurations: {len(configs) - len(todo)} already in the ledger, {len(todo)} to train")
    by_settings: dict[tuple, list[tuple[TrainConfig, str]]] = defaultdict(list)
    for config, key in todo:  # heads sharing data, schedule and head architecture can share a pass
        by_settings[(config.head, config.solver, config.shared(), tuple(config.head_options().items()))].append((config, key))
    dev = resolve_device(device)
    task = reader.task
    groups: list[list[tuple[TrainConfig, str]]] = []
    for (kind, *_), members in by_settings.items():
        size = len(members) if kind == "linear" else deit_per_pass  # linear heads: all at once (one stacked layer, one load)
        if size == AUTO:
            size = heads_per_pass(members[0][0], reader, task.num_outputs, dev, len(members))
            console.print(f"--deit-per-pass auto: {size} DeiT head(s) per pass on {device_label(dev)}")
        groups += [members[i : i + size] for i in range(0, len(members), size)]
    passes, saved = 0, {}
    if todo:
        warn_random(reader, next((c for c, _ in todo if get_head(c.head).options), todo[0][0]), console)

    # --- train group by group: one pass over the features per epoch for each group
    with Progress(console=console, transient=True) as progress, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RANDOM_DEIT_WARNING)
        for members in groups:
            first = members[0][0]
            rows = subset_rows(reader, first.train_subset) if first.train_subset is not None else None  # `probe curve`
            source = FeatureSource(reader, first.feature, first.batch_size, max_ram, first.views, rows=rows)
            started = time.perf_counter()
            if first.solver == "lbfgs":  # one fit each, on features loaded once for the group
                results = [fit_logreg(c, source, task, dev, progress) for c, _ in members]
                edges = sum(edge_note(r) is not None for r in results)
                if edges:
                    console.print(f"[yellow]{edges} of {len(results)} L-BFGS fits chose a C at the edge of their grid or stopped "
                                  "before converging (metrics.json: C, C_at_edge, converged)[/]")
            else:
                heads = [make_head(c, source.row_shape, task.num_outputs) for c, _ in members]
                with small_on_one_thread(heads, dev):
                    results = fit(heads, [c for c, _ in members], source, task, dev, progress)
            seconds = time.perf_counter() - started
            test_labels = results[0].predictions["test"][0]  # heads of a group score the same test rows
            healths = check_runs(task, test_labels, [r.predictions["test"][1] for r in results])
            for result, (_, key), health in zip(results, members, healths, strict=True):
                saved[key] = save_run(reader, result, key, ledger, total_seconds=seconds, device=device_label(dev), shared=len(members),
                                      health=health, reliability=False)
            passes += source.passes["train"]
            subset = f" ({len(rows)} train rows)" if rows is not None else ""
            console.print(f"trained {len(members)} {first.head} head(s) on {first.feature}{subset} in {seconds:.1f} s "
                          f"({source.passes['train']} passes over the train features)")
    return passes, saved


def heads_per_pass(config: TrainConfig, reader: CacheReader, outputs: int, device: torch.device, count: int) -> int:
    """How many heads like `config` train side by side (`--deit-per-pass auto`): on CUDA, as many as half the free
    memory holds, from the peak of one head's training step on a batch of its rows, at most `count`; 1 on the CPU,
    where heads side by side gain nothing over one after another."""
    if device.type != "cuda":
        return 1
    row_shape = tuple(reader.dataset("train", config.feature).shape[1:])
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    head = make_head(config, row_shape, outputs).to(device)
    optimizer = torch.optim.AdamW(head.parameters())
    with torch.autocast("cuda", dtype=precision(device, protocol=config.protocol).dtype):
        loss = head(torch.zeros(config.batch_size, *row_shape, device=device)).float().sum()
    loss.backward()
    optimizer.step()
    used = torch.cuda.max_memory_allocated(device) - before
    del head, optimizer, loss
    torch.cuda.empty_cache()
    return max(1, min(count, int(free / 2 // max(used, 1))))


def draw_reliability(run: RunRecord) -> None:
    """The reliability diagram of a run of the best configuration, from its stored test predictions, unless it has one.

    A sweep draws it for its best configuration alone: one figure per head would cost more than training the heads."""
    folder = Path(run.run_dir or "")
    if (folder / PREDICTIONS).is_file() and not (folder / RELIABILITY).exists():  # runs of medfm before 0.2 kept no predictions
        test = load_predictions(folder)
        reliability_diagram(folder / RELIABILITY, test.labels, test.logits)
