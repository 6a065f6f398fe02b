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
from probe.names import check_head
from probe.recipe import STUDY
from probe.results import Ledger

# Training modules (torch, timm, scikit-learn) load inside the commands that train, and the report's
# (pandas, matplotlib) inside `report`: seconds saved on --help and on every mistake caught early.

app = typer.Typer(help="Train heads on cached features and report results.", no_args_is_help=True, add_completion=False)
console = Console()

Backbone = Annotated[str | None, typer.Option(help="Backbone whose cache to use (see `cache ls`).", show_default="none, needed unless --cache")]
Dataset = Annotated[str | None, typer.Option(help="Dataset whose cache to use.", show_default="none, needed unless --cache")]
CacheFile = Annotated[Path | None, typer.Option("--cache", help="A cache file, when several match or to bypass the search.",
                                                show_default="found from --backbone and --dataset")]
MaxRam = Annotated[str | None, typer.Option(help="RAM for features, e.g. 8G; larger token caches stream.", show_default="half of free RAM")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
Standardize = Annotated[bool, typer.Option(help="Linear head: standardize features with the train mean/std (MAE-style; the study does not).")]
Epochs = Annotated[int, typer.Option(help="Training epochs (the study's).")]
BatchSize = Annotated[int, typer.Option(help="Rows per step (the study's).")]
WarmupSteps = Annotated[int | None, typer.Option(help="Linear LR warmup in optimizer steps, constant after.", show_default=(
    f"the study's, {STUDY.warmup_epochs} epochs but at most {STUDY.warmup_max_steps} steps"))]
GradClip = Annotated[float, typer.Option(help="Gradient norm clip, per head (0: none).")]
Views = Annotated[str, typer.Option(help="Augmented train views of the cache to train on, epoch e on view (e-1) mod K "
                                         "(the study's frozen protocol); 0: the eval view; auto: all the cache holds.")]
Protocol = Annotated[str, typer.Option(help="medfm | study: the official code's model selection and DeiT-head rules (docs/protocol.md §7).")]


def parse_views(text: str, held: int) -> int:
    """`auto` -> every augmented view the cache holds (0 when it holds none); else a count."""
    if text == "auto":
        return held
    try:
        return int(text)
    except ValueError:
        raise MedfmError(f"--views must be auto or a number of views, got '{text}'") from None


@app.command()
def run(
    head: Annotated[str, typer.Option(help="linear (pooled feature) | deit (DeiT blocks on the tokens) (see probe/heads.py).")] = "linear",
    backbone: Backbone = None,
    dataset: Dataset = None,
    cache: CacheFile = None,
    layer: Annotated[int | None, typer.Option(help="Block whose features to use, as extract's --layers: 8, or -4 from the end.",
                                              show_default="the last")] = None,
    epochs: Epochs = STUDY.epochs,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = STUDY.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (never on biases and norms).")] = STUDY.weight_decay,
    batch_size: BatchSize = STUDY.batch_size,
    warmup_steps: WarmupSteps = None,
    patience: Annotated[int | None, typer.Option(help="Stop after this many epochs without a better validation score.",
                                                 show_default="never, every epoch trains")] = None,
    grad_clip: GradClip = STUDY.grad_clip,
    seed: Annotated[int, typer.Option(help="Seed of the head's initialisation.")] = 0,
    data_seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    head_depth: Annotated[int, typer.Option(help="DeiT head: number of blocks (the study: 12).")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b (the study) | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head init: default (ImageNet DeiT if present, else random) | random | PATH.")] = "default",
    standardize: Standardize = False,
    views: Views = "auto",
    protocol: Protocol = "medfm",
    max_ram: MaxRam = None,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Retrain even if the ledger already holds this run.")] = False,
) -> None:
    """Train one head on a cache with the study's recipe; a run already in the ledger is skipped."""
    check_head(head)  # a typo is one line before torch loads
    from probe.heads import get_head
    from probe.run import run_probe
    from probe.train import TrainConfig

    path = find_cache(backbone, dataset, cache)
    with open_cache(path, backbone, dataset) as reader:
        config = TrainConfig(
            head=head, feature=feature_name(reader, get_head(head).reads, layer), lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            epochs=epochs, warmup_steps=warmup_steps, patience=patience, grad_clip=grad_clip or None, seed=seed,
            data_seed=data_seed, head_depth=head_depth, head_preset=head_preset, head_weights=head_weights, standardize=standardize,
            views=parse_views(views, reader.meta.views), protocol=protocol,
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
    patience: Annotated[int | None, typer.Option(help="Stop a head after this many epochs without a better validation score.",
                                                 show_default="never, every epoch trains")] = None,
    grad_clip: GradClip = STUDY.grad_clip,
    data_seed: Annotated[int, typer.Option(help="Seed of the batch order, shared by the whole sweep.")] = 0,
    head_depth: Annotated[int, typer.Option(help="DeiT head: number of blocks.")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head init: default | random | PATH.")] = "default",
    standardize: Standardize = False,
    views: Views = "auto",
    protocol: Protocol = "medfm",
    max_ram: MaxRam = None,
    device: Device = "auto",
    deit_per_pass: Annotated[int, typer.Option(help="DeiT heads trained side by side over one read of the tokens "
                                                   "(each needs its own activation memory).")] = 1,
    force: Annotated[bool, typer.Option(help="Retrain configurations the ledger already holds.")] = False,
) -> None:
    """Train a grid of heads on one cache (linear heads together, in one pass per epoch); report the best by validation."""
    for name in _values(head, str, "--head"):
        check_head(name)  # a typo is one line before torch loads
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
                           head_weights=head_weights, standardize=standardize, views=parse_views(views, reader.meta.views),
                           protocol=protocol)
        outcome = run_sweep(reader, expand(reader, grid, base), device=device, max_ram=_ram(max_ram), force=force,
                            deit_per_pass=deit_per_pass, console=console)
    table = Table("head", "feature", "lr", "weight decay", "seed", f"val {outcome.records[0].primary_metric}",
                  f"test {outcome.records[0].primary_metric}", title=f"sweep: {outcome.trained} trained, {outcome.skipped} already in the ledger")
    best_ids = {r.id for r in outcome.best_runs}
    for r in outcome.records:
        table.add_row(r.head, r.config["feature"], f"{r.config['lr']:g}", f"{r.config['weight_decay']:g}", str(r.seed),
                      _cell(r.val_score, False), _cell(r.test_primary, False), style="bold green" if r.id in best_ids else None)
    console.print(table)
    if outcome.best is not None:
        b, n = outcome.best, len(outcome.best_runs)
        seeds = f"mean over {n} seeds ({', '.join(str(r.seed) for r in outcome.best_runs)})" if n > 1 else f"seed {b.seed}"
        console.print(f"best by mean validation: {b.head} head, {b.config['feature']}, lr {b.config['lr']:g}, weight decay "
                      f"{b.config['weight_decay']:g}, {seeds}: val {outcome.best_val:.4f}, test {b.primary_metric} "
                      f"{outcome.best_test:.4f} (n={n}; as `probe report` chooses)")
    late = [r for r in outcome.records if r.late_best]
    if late:
        console.print(f"[yellow]{len(late)} of {len(outcome.records)} runs had their best validation epoch in the last tenth of "
                      f"their epochs and may not have converged; raise --epochs"
                      + (" or use --standardize[/]" if any(r.head == "linear" and not r.config.get("standardize") for r in late) else "[/]"))


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
    dataset: Annotated[list[str] | None, typer.Option(help="Datasets to include (repeatable): a name, a column's label such as "
                                                           "csv:a1b2, or a dataset id prefix.", show_default="all in the ledger")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.csv, report.md, report.png.", show_default="$MEDFM_OUTPUT/reports")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")] = None,
    partial: Annotated[bool, typer.Option(help="Also average rows that lack a dataset, over the datasets they have (still marked).")] = False,
    name: Annotated[list[str] | None, typer.Option(help="Name a dataset column, LABEL=NAME or ID=NAME (repeatable), e.g. "
                                                        "csv:a1b2=ward-a.", show_default="none")] = None,
) -> None:
    """The study's table (backbone x scenario by dataset, average, gain over deit linear) and figure."""
    from rich.markup import escape

    from probe.report import AVERAGE, GAIN, is_random, make_report, notes

    result = make_report(Ledger(ledger), dataset, out or output_root() / "reports", partial=partial, names=_names(name or []))
    if result.table.empty:
        raise MedfmError("the ledger holds no runs" + (f" for {', '.join(dataset)}" if dataset else "") + "; train some with `probe run`")
    table = Table("backbone x scenario", *[escape(f"{c.label}\n({c.metric})") for c in result.columns], AVERAGE, "gain vs deit\nlinear (%)",
                  title=f"test scores, {result.runs} runs (cells selected by validation)")
    for key in result.table.index:
        label = escape(result.rows[key].label)
        table.add_row(f"[bold red]{label}[/]" if is_random(key) else label, *[result.cell(key, c.label) for c in result.columns],
                      _cell(result.table.loc[key, AVERAGE], False), _cell(result.table.loc[key, GAIN], True))
    console.print(table)
    for line in notes(result)[2:]:
        console.print(f"[bold red]{escape(line)}[/]" if line.startswith("RANDOM") else escape(line), highlight=False)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")


def _names(pairs: list[str]) -> dict[str, str]:
    """`csv:a1b2=ward-a` -> {"csv:a1b2": "ward-a"}: the split is at the last '='."""
    out = {}
    for pair in pairs:
        given, sep, label = pair.rpartition("=")
        if not sep or not given or not label:
            raise MedfmError(f"--name expects LABEL=NAME or ID=NAME, got '{pair}'")
        out[given] = label
    return out


def _cell(value: float, percent: bool) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:+.2f}" if percent else f"{value:.4f}"


def _ram(text: str | None) -> int | None:
    return parse_bytes(text) if text is not None else None


def main() -> None:
    run_cli(app, "probe", interrupted="interrupted; finished runs are kept in the ledger, and the same command skips them "
                                      "and trains the rest")
