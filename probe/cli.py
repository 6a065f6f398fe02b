"""`probe`: train heads on cached features (run, sweep) and report the ledger. Parsing only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.cli import run_cli
from common.errors import MedfmError
from common.runtime import output_root
from probe.data import feature_name, find_cache, open_cache, parse_bytes
from probe.recipe import STUDY
from probe.results import Ledger

# Training modules (torch, timm, scikit-learn) load inside the commands that train, and the report's
# (pandas, matplotlib) inside `report`: seconds saved on --help and on every mistake caught early.

app = typer.Typer(help="Train heads on cached features and report results.", no_args_is_help=True, add_completion=False)
console = Console()

Backbone = Annotated[str | None, typer.Option(help="Backbone whose cache to use (see `cache ls`).")]
Dataset = Annotated[str | None, typer.Option(help="Dataset whose cache to use.")]
CacheFile = Annotated[Path | None, typer.Option("--cache", help="A cache file, when several match or to bypass the search.")]
MaxRam = Annotated[str | None, typer.Option(help="RAM for features, e.g. 8G; larger token caches stream [default: half of free RAM].")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
Standardize = Annotated[bool, typer.Option(help="Linear head: standardize features with the train mean/std (MAE-style; the study does not).")]
Epochs = Annotated[int, typer.Option(help="Training epochs (the study's).")]
BatchSize = Annotated[int, typer.Option(help="Rows per step (the study's).")]
WarmupSteps = Annotated[int | None, typer.Option(help=f"Linear LR warmup in optimizer steps, constant after [default: the study's, "
                                                     f"{STUDY.warmup_epochs} epochs but at most {STUDY.warmup_max_steps} steps].")]
GradClip = Annotated[float, typer.Option(help="Gradient norm clip, per head (0: none).")]


@app.command()
def run(
    head: Annotated[str, typer.Option(help="linear (pooled feature) | deit (DeiT blocks on the tokens) (see probe/heads.py).")] = "linear",
    backbone: Backbone = None,
    dataset: Dataset = None,
    cache: CacheFile = None,
    layer: Annotated[int | None, typer.Option(help="Block whose features to use, as extract's --layers: 8, or -4 from the end [default: last].")] = None,
    epochs: Epochs = STUDY.epochs,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = STUDY.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (never on biases and norms).")] = STUDY.weight_decay,
    batch_size: BatchSize = STUDY.batch_size,
    warmup_steps: WarmupSteps = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better validation score.")] = None,
    grad_clip: GradClip = STUDY.grad_clip,
    seed: Annotated[int, typer.Option(help="Seed of the head's initialisation.")] = 0,
    data_seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    head_depth: Annotated[int, typer.Option(help="DeiT head: number of blocks (the study: 12).")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b (the study) | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head init: default (ImageNet DeiT if present, else random) | random | PATH.")] = "default",
    standardize: Standardize = False,
    max_ram: MaxRam = None,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Retrain even if the ledger already holds this run.")] = False,
) -> None:
    """Train one head on a cache with the study's recipe; a run already in the ledger is skipped."""
    from probe.heads import get_head
    from probe.run import run_probe
    from probe.train import TrainConfig

    path = find_cache(backbone, dataset, cache)
    with open_cache(path, backbone, dataset) as reader:
        config = TrainConfig(
            head=head, feature=feature_name(reader, get_head(head).reads, layer), lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            epochs=epochs, warmup_steps=warmup_steps, patience=patience, grad_clip=grad_clip or None, seed=seed,
            data_seed=data_seed, head_depth=head_depth, head_preset=head_preset, head_weights=head_weights, standardize=standardize,
        )
        run_probe(reader, config, device=device, max_ram=_ram(max_ram), force=force, console=console)


@app.command()
def sweep(
    backbone: Backbone = None,
    dataset: Dataset = None,
    cache: CacheFile = None,
    head: Annotated[str, typer.Option(help="Heads, comma-separated: linear,deit.")] = "linear",
    lr: Annotated[str, typer.Option(help="Learning rates, comma-separated.")] = f"{STUDY.lr:g}",
    weight_decay: Annotated[str, typer.Option(help="Weight decays, comma-separated.")] = f"{STUDY.weight_decay:g}",
    seed: Annotated[str, typer.Option(help="Head-initialisation seeds, comma-separated.")] = "0",
    layer: Annotated[str, typer.Option(help="Blocks, comma-separated, among those the cache stored (-4 counts from the end); 'last' for the last.")] = "last",
    epochs: Epochs = STUDY.epochs,
    batch_size: BatchSize = STUDY.batch_size,
    warmup_steps: WarmupSteps = None,
    patience: Annotated[int | None, typer.Option(help="Stop a head after this many epochs without a better validation score.")] = None,
    grad_clip: GradClip = STUDY.grad_clip,
    data_seed: Annotated[int, typer.Option(help="Seed of the batch order, shared by the whole sweep.")] = 0,
    head_depth: Annotated[int, typer.Option(help="DeiT head: number of blocks.")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head init: default | random | PATH.")] = "default",
    standardize: Standardize = False,
    max_ram: MaxRam = None,
    device: Device = "auto",
    deit_per_pass: Annotated[int, typer.Option(help="DeiT heads trained side by side over one read of the tokens "
                                                   "(each needs its own activation memory).")] = 1,
    force: Annotated[bool, typer.Option(help="Retrain configurations the ledger already holds.")] = False,
) -> None:
    """Train a grid of heads on one cache (linear heads together, in one pass per epoch); report the best by validation."""
    from probe.sweep import Grid, expand, run_sweep
    from probe.train import TrainConfig

    path = find_cache(backbone, dataset, cache)
    with open_cache(path, backbone, dataset) as reader:
        grid = Grid(
            heads=tuple(_values(head, str, "--head")), lrs=tuple(_values(lr, float, "--lr")),
            weight_decays=tuple(_values(weight_decay, float, "--weight-decay")), seeds=tuple(_values(seed, int, "--seed")),
            layers=tuple(_layer(v) for v in _values(layer, str, "--layer")),
        )
        base = TrainConfig(batch_size=batch_size, epochs=epochs, warmup_steps=warmup_steps, patience=patience,
                           grad_clip=grad_clip or None, data_seed=data_seed, head_depth=head_depth, head_preset=head_preset,
                           head_weights=head_weights, standardize=standardize)
        outcome = run_sweep(reader, expand(reader, grid, base), device=device, max_ram=_ram(max_ram), force=force,
                            deit_per_pass=deit_per_pass, console=console)
    table = Table("head", "feature", "lr", "weight decay", "seed", f"val {outcome.records[0].primary_metric}",
                  f"test {outcome.records[0].primary_metric}", title=f"sweep: {outcome.trained} trained, {outcome.skipped} already in the ledger")
    for r in outcome.records:
        style = "bold green" if outcome.best is not None and r.id == outcome.best.id else None
        table.add_row(r.head, r.config["feature"], f"{r.config['lr']:g}", f"{r.config['weight_decay']:g}", str(r.seed),
                      _cell(r.val_score, False), _cell(r.test_primary, False), style=style)
    console.print(table)
    if outcome.best is not None:
        b = outcome.best
        console.print(f"best by validation: {b.head} head, {b.config['feature']}, lr {b.config['lr']:g}, weight decay "
                      f"{b.config['weight_decay']:g}, seed {b.seed}: val {b.val_score:.4f}, test {b.primary_metric} {b.test_primary:.4f}")


def _values(text: str, kind: type, flag: str) -> list:
    """`1e-4,1e-3` -> [0.0001, 0.001]; a bad value is a user error naming the flag."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedfmError(f"{flag} takes comma-separated {kind.__name__} values, got '{text}'") from None
    if not values:
        raise MedfmError(f"{flag} needs at least one value")
    return values


def _layer(text: str) -> int | None:
    """A `--layer` value of a sweep: 'last' (None) or a block index such as 8 or -4."""
    if text == "last":
        return None
    try:
        return int(text)
    except ValueError:
        raise MedfmError(f"--layer takes comma-separated block indices such as 8 or -4, or 'last'; got '{text}'") from None


@app.command()
def report(
    dataset: Annotated[list[str] | None, typer.Option(help="Datasets to include (repeatable) [default: all in the ledger].")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.csv, report.md, report.png [default: $MEDFM_OUTPUT/reports].")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Results ledger [default: $MEDFM_OUTPUT/runs/results.sqlite].")] = None,
) -> None:
    """The study's table (backbone x scenario by dataset, average, gain over deit linear) and figure."""
    from probe.report import GAIN, RANDOM_NOTE, is_random, make_report, row_label

    result = make_report(Ledger(ledger), dataset, out or output_root() / "reports")
    if result.table.empty:
        raise MedfmError("the ledger holds no runs" + (f" for {', '.join(dataset)}" if dataset else "") + "; train some with `probe run`")
    table = Table("backbone x scenario", *[f"{c}\n({result.metrics[c]})" if c in result.metrics else c for c in result.table.columns],
                  title=f"test scores, {result.runs} runs (cells selected by validation)")
    for key, row in result.table.iterrows():
        label = row_label(key)
        table.add_row(f"[bold red]{label}[/]" if is_random(key) else label, *[_cell(v, c == GAIN) for c, v in row.items()])
    console.print(table)
    if any(is_random(key) for key in result.table.index):
        console.print(f"[bold red]{RANDOM_NOTE}[/]")
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")


def _cell(value: float, percent: bool) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:+.2f}" if percent else f"{value:.4f}"


def _ram(text: str | None) -> int | None:
    return parse_bytes(text) if text is not None else None


def main() -> None:
    run_cli(app, "probe", interrupted="interrupted; finished runs are kept in the ledger, and the same command skips them "
                                      "and trains the rest")
