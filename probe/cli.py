"""`probe`: train heads on cached features (run, sweep) and report the ledger. Parsing only."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cache.layout import find_cache, open_cache
from common.cli import run_cli
from common.errors import MedfmError
from common.runtime import check_folder, output_root
from ledger.store import Ledger
from probe.data import feature_name, parse_bytes
from probe.solvers import check_solver
from training.names import check_head
from training.recipe import STUDY

if TYPE_CHECKING:
    from cache.store import CacheReader
    from probe.config import TrainConfig

# Training modules (torch, timm, scikit-learn) load inside the commands that train, and the report's
# (pandas, matplotlib) inside `report`: seconds saved on --help and on every mistake caught early.

app = typer.Typer(help="Train heads on cached features and report results.", no_args_is_help=True, add_completion=False)
console = Console()

Backbone = Annotated[str | None, typer.Option(help="Backbone whose cache to use (see `cache ls`).", show_default="none, needed unless --cache")]
Dataset = Annotated[str | None, typer.Option(help="Dataset whose cache to use.", show_default="none, needed unless --cache")]
CacheFile = Annotated[Path | None, typer.Option("--cache", help="A cache file, when several match or to bypass the search.",
                                                show_default="found from --backbone and --dataset")]
BackboneSeed = Annotated[int, typer.Option(help="Use the cache of a null backbone: random weights of draw K (extracted with "
                                                 "`extract run --weights random:K`); the report sets these runs apart as the null "
                                                 "every cell must beat. 0: the backbone's own cache.")]
MaxRam = Annotated[str | None, typer.Option(help="RAM for features, e.g. 8G; larger token caches stream.", show_default="half of free RAM")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
Standardize = Annotated[bool, typer.Option(help="Linear head: standardize features with the train mean/std (MAE-style; the study does not).")]
Epochs = Annotated[int, typer.Option(help="Training epochs (the study's).")]
BatchSize = Annotated[int, typer.Option(help="Rows per step (the study's).")]
WarmupSteps = Annotated[int | None, typer.Option(help="Linear LR warmup in optimizer steps, constant after.", show_default=(
    f"the study's, {STUDY.warmup_epochs} epochs but at most {STUDY.warmup_max_steps} steps"))]
GradClip = Annotated[float, typer.Option(help="Gradient norm clip, per head (0: none).")]
EVALUATION_TABLES = ("all", "robustness", "transfer", "none")  # `probe report --evaluations`
DEFAULT_FRACTIONS = "0.01,0.05,0.1,0.25,0.5,1"  # `probe curve`'s labelled fractions of the train split
Views = Annotated[str, typer.Option(help="Augmented train views of the cache to train on, epoch e on view (e-1) mod K "
                                         "(the study's frozen protocol); 0: the eval view; auto: all the cache holds.")]
Protocol = Annotated[str, typer.Option(help="medfm | study: the official code's model selection and DeiT-head rules (docs/protocol.md §7).")]
Solver = Annotated[str, typer.Option(help=(
    "auto | lbfgs | adamw: how the linear head is fit. lbfgs: a logistic regression on standardized features, solved to "
    "convergence by L-BFGS, its L2 strength C chosen on validation over 1e-4..1e4. adamw: the study's recipe; --lr, --epochs, "
    "--batch-size, --weight-decay, --warmup-steps, --patience, --grad-clip and --standardize apply to it alone. auto (the "
    "default): lbfgs for the linear head under --protocol medfm on the eval view; adamw under --protocol study, for the "
    "DeiT head and on augmented --views."))]


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
    head: Annotated[str, typer.Option(help="linear (pooled feature) | deit (DeiT blocks on the tokens) | knn (nearest neighbours, no training) | zeroshot (CLIP text embeddings from `extract zeroshot`) (see probe/heads.py).")] = "linear",
    backbone: Backbone = None,
    dataset: Dataset = None,
    cache: CacheFile = None,
    backbone_seed: BackboneSeed = 0,
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
    seed: Annotated[int | None, typer.Option(help="Seed of the head's initialisation.", show_default="0")] = None,
    seeds: Annotated[str | None, typer.Option(help="Several head seeds, comma-separated (0,1,2): one head each, trained together "
                                                   "as a sweep; the report averages them.", show_default="none, --seed alone")] = None,
    data_seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    head_depth: Annotated[int, typer.Option(help="DeiT head: number of blocks (the study: 12).")] = 12,
    head_preset: Annotated[str, typer.Option(help="DeiT head width: deit-b (the study) | deit-s | deit-t.")] = "deit-b",
    head_weights: Annotated[str, typer.Option(help="DeiT head init: default (ImageNet DeiT if present, else random) | random | PATH.")] = "default",
    standardize: Standardize = False,
    views: Views = "auto",
    protocol: Protocol = "medfm",
    solver: Solver = "auto",
    max_ram: MaxRam = None,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Retrain even if the ledger already holds this run.")] = False,
    calibrate: Annotated[bool, typer.Option(help="Fit a temperature on the validation logits and add the test split's calibration "
                                                 "metrics with it (<name>_calibrated; T in metrics.json). Single-label tasks.")] = False,
    folds: Annotated[int, typer.Option(help="K-fold cross-validation for small datasets: the train and test rows pooled and cut "
                                            "into K stratified folds, one run per fold (val stays the validation set); the "
                                            "report gives the mean and spread over folds. 0: the cache's own split.")] = 0,
    fold_groups: Annotated[str | None, typer.Option(help="Metadata column whose values never straddle two folds (none: no "
                                                         "grouping).", show_default="a patient column when the cache stores one")] = None,
) -> None:
    """Train one head on a cache (one per seed with --seeds, one per fold with --folds); a run already in the ledger is
    skipped. A linear head is a logistic regression solved by L-BFGS, C chosen on validation, unless --protocol study or
    --solver adamw (the study's recipe, which the DeiT head always trains with)."""
    check_head(head)  # a typo is one line before torch loads
    check_solver(solver)
    several = parse_seeds(seeds, seed)
    if calibrate and several is not None:
        raise MedfmError("--calibrate applies to one run: give --seed, not --seeds")
    if folds:
        from probe.folds import check_folds

        check_folds(folds)
        if several is not None:
            raise MedfmError("--folds trains one head per fold: give --seed, not --seeds")
    from probe.config import TrainConfig
    from probe.heads import get_head
    from probe.run import late_hint, run_probe

    path = find_cache(backbone, dataset, cache, backbone_seed=backbone_seed)
    with open_cache(path, backbone, dataset) as reader:
        config = TrainConfig(
            head=head, feature=feature_name(reader, get_head(head).reads, layer), lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            epochs=epochs, warmup_steps=warmup_steps, patience=patience, grad_clip=grad_clip or None, seed=seed or 0,
            data_seed=data_seed, head_depth=head_depth, head_preset=head_preset, head_weights=head_weights, standardize=standardize,
            views=solver_views(views, reader.meta.views, solver) if get_head(head).trains else 0, protocol=protocol,  # kNN: the eval view
            solver=solver,
        )
        if folds:
            _run_folds(reader, config, folds, fold_groups, views, device=device, max_ram=_ram(max_ram), force=force,
                       calibrate=calibrate)
            return
        if several is None:
            run_probe(reader, config, device=device, max_ram=_ram(max_ram), force=force, console=console, calibrate=calibrate)
            return
        from probe.sweep import Grid, expand, run_sweep

        grid = Grid(heads=(head,), lrs=(lr,), weight_decays=(weight_decay,), seeds=tuple(several), layers=(layer,))
        outcome = run_sweep(reader, expand(reader, grid, config), device=device, max_ram=_ram(max_ram), force=force, console=console)
    _say_seeds(outcome.records, late_hint(config))


def _run_folds(reader: CacheReader, config: TrainConfig, folds: int, groups: str | None, views: str, **options: Any) -> None:
    """One run per fold of `folds`, on the eval view, then each fold's line and their mean and spread."""
    from dataclasses import replace

    from probe.folds import group_column
    from probe.run import describe, run_probe

    if views not in ("auto", "0"):
        raise MedfmError("--folds trains on the eval view: give --views 0 (augmented views exist for the cache's train rows only)")
    column = None if groups is not None and groups.lower() == "none" else group_column(reader, groups)
    console.print(f"{folds}-fold cross-validation over the train and test rows of {reader.path.name}, "
                  + (f"grouped by '{column}'" if column else "no grouping column") + "; val stays the validation set")
    records = [run_probe(reader, replace(config, views=0, folds=folds, fold=i, fold_groups=column), console=console, **options).record
               for i in range(folds)]
    for i, r in enumerate(records):
        console.print(f"fold {i}: {describe(r)}")
    tests = [r.test_primary for r in records if r.test_primary is not None and r.test_primary == r.test_primary]
    spread = f" ± {statistics.stdev(tests):.4f} (std over folds)" if len(tests) > 1 else ""
    console.print(f"mean over {folds} folds: test {records[0].primary_metric} {statistics.fmean(tests):.4f}{spread}"
                  if tests else f"no fold gave a finite test {records[0].primary_metric}")


def solver_views(text: str, held: int, solver: str) -> int:
    """`--views` for `--solver`: auto is the eval view for lbfgs (it fits one fixed view), every view the cache holds else."""
    return 0 if solver == "lbfgs" and text == "auto" else parse_views(text, held)


def parse_seeds(seeds: str | None, seed: int | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2] (a seed given twice is one run); None when only --seed (or neither) is given."""
    if seeds is None:
        return None
    if seed is not None:
        raise MedfmError("give --seed or --seeds, not both")
    return list(dict.fromkeys(_values(seeds, int, "--seeds")))


def _say_seeds(records: list, hint: str) -> None:
    """Each seed's line, then their mean and standard deviation: what the report's cell will show."""
    from ledger.records import mean_score
    from probe.run import describe

    for r in records:
        console.print(f"seed {r.seed}: {describe(r)}")
    tests = [r.test_primary for r in records if r.test_primary is not None and r.test_primary == r.test_primary]
    spread = f" ± {statistics.stdev(tests):.4f} (std over seeds)" if len(tests) > 1 else ""
    r = records[0]
    console.print(f"mean over {len(records)} seeds ({', '.join(str(r.seed) for r in records)}): val {r.primary_metric} "
                  f"{mean_score([r.val_score for r in records]):.4f}, test {r.primary_metric} {mean_score(tests):.4f}{spread}")
    late = [r for r in records if r.late_best]
    if late:
        console.print(f"[yellow]{len(late)} of {len(records)} seeds had their best validation epoch in the last tenth of their "
                      f"epochs and may not have converged; {hint}[/]")


@app.command()
def sweep(
    backbone: Backbone = None,
    dataset: Dataset = None,
    cache: CacheFile = None,
    backbone_seed: BackboneSeed = 0,
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
    solver: Solver = "auto",
    max_ram: MaxRam = None,
    device: Device = "auto",
    deit_per_pass: Annotated[str, typer.Option(help="DeiT heads trained side by side over one read of the tokens (each needs its "
                                                   "own activation memory), or auto: as many as half the GPU's free memory holds "
                                                   "(1 on the CPU).")] = "1",
    force: Annotated[bool, typer.Option(help="Retrain configurations the ledger already holds.")] = False,
) -> None:
    """Train a grid of heads on one cache; report the best by validation. AdamW heads of one schedule train together, in
    one pass per epoch; L-BFGS linear heads (the default, see --solver) choose their L2 strength themselves, so the
    --lr and --weight-decay grid applies to AdamW heads alone."""
    for name in _values(head, str, "--head"):
        check_head(name)  # a typo is one line before torch loads
    check_solver(solver)
    from probe.config import TrainConfig
    from probe.sweep import Grid, expand, run_sweep

    path = find_cache(backbone, dataset, cache, backbone_seed=backbone_seed)
    with open_cache(path, backbone, dataset) as reader:
        grid = Grid(
            heads=tuple(_values(head, str, "--head")), lrs=tuple(_values(lr, float, "--lr")),
            weight_decays=tuple(_values(weight_decay, float, "--weight-decay")), seeds=tuple(_values(seed, int, "--seed")),
            layers=tuple(_layer(v) for v in _values(layer, str, "--layer")),
        )
        base = TrainConfig(batch_size=batch_size, epochs=epochs, warmup_steps=warmup_steps, patience=patience,
                           grad_clip=grad_clip or None, data_seed=data_seed, head_depth=head_depth, head_preset=head_preset,
                           head_weights=head_weights, standardize=standardize, views=solver_views(views, reader.meta.views, solver),
                           protocol=protocol, solver=solver)
        outcome = run_sweep(reader, expand(reader, grid, base), device=device, max_ram=_ram(max_ram), force=force,
                            deit_per_pass=_per_pass(deit_per_pass), console=console)
    table = Table("head", "feature", "lr", "weight decay", "seed", f"val {outcome.records[0].primary_metric}",
                  f"test {outcome.records[0].primary_metric}", title=f"sweep: {outcome.trained} trained, {outcome.skipped} already in the ledger")
    best_ids = {r.id for r in outcome.best_runs}
    for r in outcome.records:
        table.add_row(r.head, r.config["feature"], _setting(r.config, "lr"), _setting(r.config, "weight_decay"), str(r.seed),
                      _cell(r.val_score, False), _cell(r.test_primary, False), style="bold green" if r.id in best_ids else None)
    console.print(table)
    if outcome.best is not None:
        b, n = outcome.best, len(outcome.best_runs)
        seeds = f"mean over {n} seeds ({', '.join(str(r.seed) for r in outcome.best_runs)})" if n > 1 else f"seed {b.seed}"
        fit = ("L-BFGS, C on validation" if b.config.get("solver") == "lbfgs" else
               f"lr {_setting(b.config, 'lr')}, weight decay {_setting(b.config, 'weight_decay')}")
        console.print(f"best by mean validation: {b.head} head, {b.config['feature']}, {fit}, {seeds}: val {outcome.best_val:.4f}, "
                      f"test {b.primary_metric} {outcome.best_test:.4f} (n={n}; as `probe report` chooses)")
    late = [r for r in outcome.records if r.late_best]
    if late:
        console.print(f"[yellow]{len(late)} of {len(outcome.records)} runs had their best validation epoch in the last tenth of "
                      f"their epochs and may not have converged; raise --epochs"
                      + (" or use --standardize[/]" if any(r.head == "linear" and not r.config.get("standardize") for r in late) else "[/]"))


def _setting(config: dict, name: str) -> str:
    """A recorded setting for a table cell; '-' where the run's solver did not use it (an L-BFGS run has no lr)."""
    return f"{config[name]:g}" if config.get(name) is not None else "-"


def _values(text: str, kind: type, flag: str) -> list:
    """`1e-4,1e-3` -> [0.0001, 0.001]; a bad value is a user error naming the flag."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedfmError(f"{flag} takes comma-separated {kind.__name__} values, got '{text}'") from None
    if not values:
        raise MedfmError(f"{flag} needs at least one value")
    return values


def _per_pass(text: str) -> int | str:
    """`--deit-per-pass`: auto, or a count (checked by the sweep)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise MedfmError(f"--deit-per-pass must be auto or a whole number of heads, got '{text}'") from None


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
    out: Annotated[Path | None, typer.Option(help="Folder for the report's files: report.csv, report.md, report.png (the gain) and "
                                                  "report-scores.png, named by the options that change them (report-ci95.png, "
                                                  "report-dataset-aptos2019.png), so one report never overwrites another.",
                                             show_default="$MEDFM_OUTPUT/reports")] = None,
    ledger: Annotated[Path | None, typer.Option(help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")] = None,
    partial: Annotated[bool, typer.Option(help="Also average rows that lack a dataset, over the datasets they have (still marked).")] = False,
    name: Annotated[list[str] | None, typer.Option(help="Name a dataset column, LABEL=NAME or ID=NAME (repeatable), e.g. "
                                                        "csv:a1b2=ward-a.", show_default="none")] = None,
    ci: Annotated[float | None, typer.Option(help="Confidence level (%) of bootstrap intervals for every cell, average and gain, "
                                                  "from the runs' stored test predictions, e.g. 95.", show_default="none, no intervals")] = None,
    boot: Annotated[int | None, typer.Option(help="Bootstrap resamples of the test set (with --ci).", show_default="1000")] = None,
    boot_seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples (with --ci).")] = 0,
    jobs: Annotated[int, typer.Option(help="Processes that share the bootstrap resamples (with --ci).")] = 1,
    cost: Annotated[bool, typer.Option("--cost", help="Show each row's cost (device hours of its chosen runs and their caches' "
                                                      "extraction) and print the grid's total.", show_default="off")] = False,
    by: Annotated[str | None, typer.Option(help="Per-subgroup scores by a per-sample column of the datasets (e.g. sex, age in "
                                                "decades, Frontal/Lateral): each group's score and n, the worst group and the gap; "
                                                "also written to <report>_by_<column>.csv.", show_default="none")] = None,
    min_group: Annotated[int, typer.Option(help="With --by: the fewest samples a group needs to be named the worst group "
                                                "(smaller groups are shown, with their interval, and marked small).")] = 30,
    evaluations: Annotated[str, typer.Option(help="Tables of `probe eval` scores to print: all | robustness (relative drop per "
                                                  "corruption) | transfer (score on other datasets) | none; report.md and "
                                                  "report_robustness.csv / report_transfer.csv hold them all.")] = "all",
    html: Annotated[Path | None, typer.Option(help="Also write the whole report as one self-contained HTML file (figures embedded, "
                                                   "opens from disk, printable): the table with intervals (--ci 95 unless --ci), "
                                                   "the figures, the ranking, robustness, transfer, calibration, subgroups (--by), "
                                                   "costs, and the runs and command behind every number.", show_default="none")] = None,
    latex: Annotated[Path | None, typer.Option(help="Also write booktabs LaTeX tables (the table with intervals, --ci 95 unless "
                                                    "--ci, and the ranking) to \\input into a paper.", show_default="none")] = None,
    rank: Annotated[bool, typer.Option("--rank", help="Rank the rows with a score on every dataset: mean rank with its bootstrap "
                                                      "interval, P(best), Friedman and Nemenyi tests, a verdict per pair; writes "
                                                      "<report>_ranking.csv, _ranking_pairs.csv and the critical-difference diagram "
                                                      "_ranking_cd.png.", show_default="off")] = False,
    margin: Annotated[float, typer.Option(help="With --rank: the largest difference of mean scores called equivalent.")] = 0.01,
) -> None:
    """The study's table (backbone x scenario by dataset, average, gain over deit linear) and its figures (the gain, each
    cell's score); prints the path of every file written."""
    import shlex
    import sys

    from rich.markup import escape

    from report.table import AVERAGE, COST_NOTE, GAIN, cost_text, is_random, make_report, notes
    from scoring.bootstrap import check_settings

    if html or latex:  # the page and the tables: their modules (scipy's tests among them) load only when asked for
        from report.html import check_target

        check_target(html, "--html")
        check_target(latex, "--latex")
        if html and latex and html.resolve() == latex.resolve():
            raise MedfmError(f"--html and --latex name the same file, {html}; give each its own")
        ci = 95 if ci is None else ci
    if ci is None and boot is not None:
        raise MedfmError("--boot sets the resamples of --ci intervals; give --ci too (e.g. --ci 95)")
    if evaluations not in EVALUATION_TABLES:
        raise MedfmError(f"--evaluations must be one of {', '.join(EVALUATION_TABLES)}, got '{evaluations}'")
    boot = 1000 if boot is None else boot
    if ci is not None:
        check_settings(ci, boot, jobs, boot_seed)
    check_folder(out or output_root() / "reports", "--out")
    store = Ledger(ledger, create=False)
    result = make_report(store, dataset, out or output_root() / "reports", partial=partial, names=_names(name or []),
                         ci=ci, boot=boot, boot_seed=boot_seed, jobs=jobs)
    if result.table.empty:
        raise MedfmError("the ledger holds no runs" + (f" for {', '.join(dataset)}" if dataset else "") + "; train some with `probe run`")
    table = Table("backbone x scenario", *[escape(f"{c.label}\n({c.metric})") for c in result.columns], AVERAGE, "gain vs deit\nlinear (%)",
                  *(["cost"] if cost else []), title=f"test scores, {_runs(result.runs)} (cells selected by validation)")
    for key in result.table.index:
        label = escape(result.rows[key].label)
        table.add_row(f"[bold red]{label}[/]" if is_random(key) else label, *[result.cell(key, c.label) for c in result.columns],
                      result.summary(key, AVERAGE), result.summary(key, GAIN), *([cost_text(result.costs[key])] if cost else []))
    console.print(table)
    if cost:
        console.print(escape(COST_NOTE), highlight=False)
        console.print(f"total cost of the grid ({_runs(result.runs)}, each cache's extraction once): {cost_text(result.total_cost)}",
                      highlight=False)
    for line in notes(result)[2:]:
        console.print(f"[bold red]{escape(line)}[/]" if line.startswith("RANDOM") else escape(line), highlight=False)
    subgroups = _print_subgroups(result, by, out or output_root() / "reports", min_group, ci or 95, boot, boot_seed) if by else None
    if result.evaluations is not None and evaluations != "none":
        _print_evaluations(result.evaluations, evaluations)
    ranking = None
    if rank:
        from report.ranking import rank_and_write

        ranking = rank_and_write(result, margin=margin, jobs=jobs)
        _print_ranking(ranking)
    if html or latex:
        from report.html import write_html
        from report.latex import write_latex
        from report.ranking import rank_or_reason

        ranking, command = ranking or rank_or_reason(result, margin=margin, jobs=jobs), shlex.join(["probe", *sys.argv[1:]])
        if html:
            write_html(result, html, ranking=ranking, command=command, ledger=store.path.resolve(), subgroups=subgroups)
        if latex:
            write_latex(result, latex, ranking, command)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}")


def _print_ranking(ranking) -> None:  # noqa: ANN001 - a report.ranking.Ranking
    """`probe report --rank`: each row's mean rank with its interval and P(best), then every pair's verdict."""
    from rich.markup import escape

    datasets = [c for c in ranking.table.columns if c.startswith("rank on ")]
    ranks = Table("row", f"mean rank [{ranking.level:g}%]", "P(best)", *datasets, title="ranking (1 = best)")
    for row, line in ranking.table.iterrows():
        ranks.add_row(escape(str(row)), f"{line['mean rank']:.2f} [{line['rank low']:.2f}, {line['rank high']:.2f}]",
                      f"{line['P(best)']:.2f}", *(f"{line[d]:g}" for d in datasets))
    console.print(ranks)
    pairs = Table("a vs b", "a - b", "p (Holm)", "wins/ties/losses", "verdict", title="pairs, over the datasets")
    for pair in ranking.pairs.to_dict("records"):
        detect = f" (detects >= {pair['detectable']:.3f})" if pair["verdict"] == "underpowered" else ""
        pairs.add_row(escape(f"{pair['row a']} vs {pair['row b']}"), f"{pair['difference']:+.4f} [{pair['ci low']:+.4f}, {pair['ci high']:+.4f}]",
                      f"{pair['p holm']:.3g}", f"{pair['wins']}/{pair['ties']}/{pair['losses']}", pair["verdict"] + detect)
    console.print(pairs)
    for line in ranking.notes:
        console.print(escape(line), highlight=False)


def _print_subgroups(result, by: str, out: Path, min_n: int, level: float, boot: int, seed: int) -> tuple[Any, list[str]]:  # noqa: ANN001 - a report.table.Report
    """`probe report --by`: the subgroup table with each group's interval, its notes, and its CSV among the report's files;
    returns the table and its notes (for --html)."""
    from rich.markup import escape

    from report.subgroups import subgroup_table, summary_lines, write_subgroups

    table, lines = subgroup_table(result, by, min_n=min_n, level=level, boot=boot, seed=seed)
    shown = Table("backbone x scenario", "dataset", f"{by}: score [{level:g}% interval] (n) per group", "worst group", "gap (best - worst)",
                  title=f"test scores by {by} (the report's chosen runs)")
    for line in summary_lines(table):
        shown.add_row(*map(escape, line))
    console.print(shown)
    for line in lines:
        console.print(escape(line), highlight=False)
    result.files[f"by {by}"] = write_subgroups(table, out, by, result.files["csv"].stem)
    return table, lines


def _print_evaluations(tables, which: str) -> None:  # noqa: ANN001 - a report.table.EvaluationTables
    """`probe report`: the robustness and transfer tables of the chosen runs' `probe eval` scores, with their notes."""
    from rich.markup import escape

    from report.table import ROBUSTNESS_NOTE, TRANSFER_NOTE, evaluation_lines, left_out_note

    for lines in evaluation_lines(tables, which):
        robustness = lines[0][1] == "dataset"
        shown = Table(*map(escape, lines[0]), title="relative drop (%) under corruption" if robustness else "transfer to other datasets")
        for line in lines[1:]:
            shown.add_row(*map(escape, line))
        console.print(shown)
        console.print(escape(ROBUSTNESS_NOTE if robustness else TRANSFER_NOTE), highlight=False)
    if tables.left_out:
        console.print(left_out_note(tables.left_out), highlight=False)


def _names(pairs: list[str]) -> dict[str, str]:
    """`csv:a1b2=ward-a` -> {"csv:a1b2": "ward-a"}: the split is at the last '='."""
    out = {}
    for pair in pairs:
        given, sep, label = pair.rpartition("=")
        if not sep or not given or not label:
            raise MedfmError(f"--name expects LABEL=NAME or ID=NAME, got '{pair}'")
        out[given] = label
    return out


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def _cell(value: float, percent: bool) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:+.2f}" if percent else f"{value:.4f}"


def _ram(text: str | None) -> int | None:
    return parse_bytes(text) if text is not None else None


@app.command("eval")
def evaluate_run(
    run: Annotated[str | None, typer.Argument(help="The run whose head to score: its ledger id (as `probe compare` takes it) or its run folder.",
                                              show_default="none: pick the runs with --backbone and --dataset")] = None,
    backbone: Annotated[str | None, typer.Option(help="Instead of RUN: the seeds of this backbone's best configuration by validation "
                                                      "(with --dataset and --scenario), as `probe report` picks a cell.",
                                                 show_default="none, use RUN")] = None,
    dataset: Annotated[str | None, typer.Option(help="With --backbone: the dataset the runs were trained on.",
                                                show_default="none, needed with --backbone")] = None,
    scenario: Annotated[str, typer.Option(help="With --backbone: frozen-linear | frozen-deit.")] = "frozen-linear",
    cache: Annotated[Path | None, typer.Option("--cache", help="Cache whose test split to score: a corrupted view, another dataset "
                                                               "(same backbone and settings).", show_default="the run's own cache")] = None,
    on: Annotated[str | None, typer.Option("--on", help="Instead of --cache: the cache of this dataset with the run's backbone "
                                                        "(the one `probe run --dataset` would pick).", show_default="none")] = None,
    corrupted: Annotated[bool, typer.Option("--corrupted", help="Score every corrupted view beside the cache (<stem>+<kind>-<severity>.h5) "
                                                                "instead of the cache itself.", show_default="off")] = False,
    allow_unmapped: Annotated[bool, typer.Option("--allow-unmapped", help="Score although the label map leaves classes without a "
                                                                          "counterpart: drop their rows (their labels, for multilabel).",
                                                 show_default="off")] = False,
    max_ram: MaxRam = None,
    device: Device = "auto",
    ledger: Annotated[Path | None, typer.Option(help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")] = None,
) -> None:
    """Score a run's trained head on another cache's test split (robustness, transfer); each score goes into the ledger."""
    from rich.markup import escape

    from probe.evaluate import corrupted_views, describe, evaluate, load_run
    from report.compare import best_runs

    if (run is None) == (backbone is None):
        raise MedfmError("name the run to score (probe eval RUN) or pick it with --backbone B --dataset D [--scenario S]")
    if backbone is not None and not dataset:
        raise MedfmError("picking the runs with --backbone needs --dataset, the dataset they were trained on")
    if cache is not None and on is not None:
        raise MedfmError("pass --cache FILE or --on DATASET, not both")
    runs = Ledger(ledger, create=False)
    names = [run] if run is not None else [str(r.id) for r in best_runs(runs, backbone, scenario, dataset).records]
    for name in names:
        saved = load_run(runs, name)
        clean = find_cache(saved.record.backbone, on) if on is not None else cache or saved.cache
        for path in corrupted_views(clean) if corrupted else [clean]:
            with open_cache(path, None, None) as reader:
                record = evaluate(saved, reader, runs, allow_unmapped=allow_unmapped, device=device, max_ram=_ram(max_ram))
            for line in describe(saved, record):
                console.print(escape(line), highlight=False, soft_wrap=True)


@app.command()
def compare(
    run_a: Annotated[int | None, typer.Argument(help="Ledger id of run A (the sweep's and report's run ids).",
                                                show_default="none: pick A with --backbone")] = None,
    run_b: Annotated[int | None, typer.Argument(help="Ledger id of run B.", show_default="none: pick B with --vs")] = None,
    backbone: Annotated[str | None, typer.Option(help="Side A: the best configuration by validation of this backbone (with "
                                                      "--vs, --dataset, --scenario).", show_default="none, use RUN_A")] = None,
    vs: Annotated[str | None, typer.Option(help="Side B: the best configuration by validation of this backbone.",
                                           show_default="none, use RUN_B")] = None,
    scenario: Annotated[str, typer.Option(help="Scenario of both sides with --backbone/--vs: frozen|unfrozen|last<K>-linear|deit.")] = "frozen-linear",
    dataset: Annotated[str | None, typer.Option(help="Dataset of both sides with --backbone/--vs: a name, a label such as csv:a1b2, "
                                                     "or a dataset id prefix.", show_default="none, needed with --backbone")] = None,
    boot: Annotated[int, typer.Option(help="Bootstrap resamples of the test rows.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = 0,
    allow_flagged: Annotated[bool, typer.Option("--allow-flagged", help="Give the verdict even when a run is flagged late, collapsed "
                                                                        "or at chance (exit 0).", show_default="off: exit 1 without a verdict")] = False,
    ledger: Annotated[Path | None, typer.Option(help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")] = None,
) -> None:
    """Paired comparison of two runs on the same test rows: bootstrap interval and p-value of A - B (DeLong for binary tasks).
    A run the ledger flagged (best epoch late, collapsed, at chance) gets no verdict and the command exits 1, unless
    --allow-flagged."""
    if boot < 1:
        raise MedfmError(f"--boot must be a positive number of bootstrap resamples, got {boot}")
    if seed < 0:
        raise MedfmError(f"--seed must be a whole number of 0 or more, got {seed}")
    by_id, by_choice = run_a is not None or run_b is not None, backbone is not None or vs is not None
    if by_id == by_choice:
        raise MedfmError("compare two runs by id (probe compare RUN_A RUN_B) or pick them with --backbone A --vs B --dataset D")
    if by_id and (run_a is None or run_b is None):
        raise MedfmError("give both run ids: probe compare RUN_A RUN_B")
    if by_choice and not (backbone and vs and dataset):
        raise MedfmError("picking the runs needs --backbone A, --vs B and --dataset D (and --scenario, default frozen-linear)")
    from report.compare import best_runs, certified, describe, runs_by_id
    from report.compare import compare as paired_comparison

    runs = Ledger(ledger, create=False)
    if by_id:
        a, b = runs_by_id(runs, run_a), runs_by_id(runs, run_b)
    else:
        a, b = best_runs(runs, backbone, scenario, dataset), best_runs(runs, vs, scenario, dataset)
    result = paired_comparison(a, b, boot=boot, seed=seed, allow_flagged=allow_flagged)
    for line in describe(result):
        console.print(line, highlight=False, soft_wrap=True)
    if not certified(result):
        raise typer.Exit(1)


@app.command()
def curve(
    ctx: typer.Context,
    backbone: Annotated[str | None, typer.Option(help="Backbones, comma-separated, one cache each (see `cache ls`).",
                                                 show_default="none, needed unless --cache")] = None,
    dataset: Dataset = None,
    cache: Annotated[list[Path] | None, typer.Option("--cache", help="Cache files (repeatable), instead of --backbone and --dataset.",
                                                     show_default="found from --backbone and --dataset")] = None,
    head: Annotated[str, typer.Option(help="linear | deit: the head trained on every subset.")] = "linear",
    layer: Annotated[int | None, typer.Option(help="Block whose features to use: 8, or -4 from the end.", show_default="the last")] = None,
    fractions: Annotated[str | None, typer.Option(help="Labelled fractions of each class's train rows, comma-separated, in (0, 1].",
                                                  show_default=f"{DEFAULT_FRACTIONS} unless --shots")] = None,
    shots: Annotated[str | None, typer.Option(help="Labelled train rows per class, comma-separated, instead of --fractions.",
                                              show_default="none")] = None,
    repeats: Annotated[int, typer.Option(help="Subsets drawn per point (repeat r: its own subset and head seed r).")] = 3,
    subset_seed: Annotated[int, typer.Option(help="Seed of the subsets' draw.")] = 0,
    epochs: Epochs = STUDY.epochs,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = STUDY.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = STUDY.weight_decay,
    batch_size: BatchSize = STUDY.batch_size,
    warmup_steps: WarmupSteps = None,
    standardize: Standardize = False,
    views: Views = "auto",
    solver: Solver = "auto",
    max_ram: MaxRam = None,
    device: Device = "auto",
    allow_mixed_test_sets: Annotated[bool, typer.Option("--allow-mixed-test-sets", help="Draw caches whose test sets differ on "
                                                                                       "one curve.", show_default="off: refused")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for curve.csv and curve.png.", show_default="$MEDFM_OUTPUT/reports")] = None,
) -> None:
    """Label efficiency: test score against the labelled share of the train split, nested stratified subsets, per backbone.
    Each cache trains the configuration `probe report` chose for it when the ledger has one, unless training options are
    given (--epochs, --lr, --weight-decay, --batch-size, --warmup-steps, --standardize, --views, --solver, --layer); the
    command says which it trains and why."""
    if fractions is not None and shots is not None:
        raise MedfmError("--fractions and --shots draw different curves; give one of them")
    kind, amounts = ("shots", _values(shots, int, "--shots")) if shots is not None else \
        ("fraction", _values(fractions or DEFAULT_FRACTIONS, float, "--fractions"))
    if kind == "fraction" and not all(0 < a <= 1 for a in amounts):
        raise MedfmError(f"--fractions must lie in (0, 1], got {fractions}")
    if kind == "shots" and not all(a >= 1 for a in amounts):
        raise MedfmError(f"--shots must be at least 1 row per class, got {shots}")
    if repeats < 1:
        raise MedfmError(f"--repeats must be at least 1, got {repeats}")
    check_head(head)
    check_solver(solver)
    if not cache and not (backbone and dataset):
        raise MedfmError("pass --backbone and --dataset (or --cache FILE)")
    check_folder(out or output_root() / "reports", "--out")  # a file in its place is one line before any head trains
    from contextlib import ExitStack

    from probe.config import TrainConfig
    from probe.curve import run_curve, write_curve

    if cache:
        caches = [(path, None) for path in cache]
    else:
        caches = [(find_cache(name, dataset, None), name) for name in _values(backbone, str, "--backbone")]
    with ExitStack() as stack:
        readers = [stack.enter_context(open_cache(path, name, dataset)) for path, name in caches]
        held = min(reader.meta.views for reader in readers)  # auto: the views every cache holds
        base = TrainConfig(head=head, lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, warmup_steps=warmup_steps,
                           standardize=standardize, views=solver_views(views, held, solver), solver=solver)
        outcome = run_curve(readers, base, kind, amounts, repeats, layer=layer, given=_given(ctx, CURVE_TRAINING),
                            allow_mixed_test_sets=allow_mixed_test_sets, subset_seed=subset_seed, device=device,
                            max_ram=_ram(max_ram), console=console)
    files = write_curve(outcome, out or output_root() / "reports")
    table = outcome.table()
    backbones = list(dict.fromkeys(table["backbone"]))
    shown = Table(kind, "train rows", *backbones, title=f"test {outcome.metric} on {outcome.dataset}: mean (min-max) over {repeats} repeats")
    for amount, group in table.groupby(kind, sort=False):
        shared = group["train_rows"].nunique() == 1  # else each cache's own rows, never their mean
        cells = {row.backbone: f"{row.mean:.4f} ({row.min:.4f}-{row.max:.4f})" + ("" if shared else f", {row.train_rows} rows")
                 for row in group.itertuples()}
        shown.add_row(f"{amount:g}", str(group["train_rows"].iloc[0]) if shared else "per cell", *[cells.get(b, "-") for b in backbones])
    console.print(shown)
    levels = {f"{level:.4f}" for level in outcome.chance.values()}
    chance = levels.pop() if len(levels) == 1 else ", ".join(f"{b} {level:.4f}" for b, level in outcome.chance.items())
    console.print(f"chance level of test {outcome.metric}: {chance}" + ("; the caches' test sets differ" if outcome.mixed else ""),
                  highlight=False)
    console.print(f"{outcome.trained} heads trained, {outcome.skipped} already in the ledger "
                  f"({outcome.train_passes} passes over train features)")
    for kind_, path in files.items():
        console.print(f"{kind_}: {path}")


@app.command("predict")
def predict_images(
    run: Annotated[str, typer.Argument(help="The run: its ledger id or its run folder (a probe or a finetune run).", show_default=False)],
    images: Annotated[Path, typer.Option(help="A folder of images (searched recursively), or a CSV whose `path` column lists them "
                                              "(relative to the CSV's folder).", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="The CSV to write: id, path, prediction, p_<class> per class.",
                                             show_default="$MEDFM_OUTPUT/predictions/<run folder>-<images>.csv")] = None,
    weights: Annotated[str | None, typer.Option(help="The backbone's weights file, where the run's cache was extracted from one.",
                                                show_default="those the run's cache names")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Device = "auto",
    ledger: Annotated[Path | None, typer.Option(help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")] = None,
) -> None:
    """Predict unlabelled images with a finished run: its backbone, its exact input pipeline and its trained head."""
    if not images.expanduser().exists():  # one line before torch loads
        raise MedfmError(f"--images {images} does not exist; pass a folder of images or a CSV with a 'path' column")
    from predict.predict import predict

    model, found = predict(run, images, ledger=Ledger(ledger), device=device, weights=weights, batch_size=batch_size)
    path = out or output_root() / "predictions" / f"{Path(model.record.run_dir or '').name}-{images.stem}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    found.to_csv(path, index=False)
    console.print(f"wrote {len(found)} predictions of run {model.record.id} ({model.record.backbone}/{model.record.dataset} "
                  f"{model.record.head}) to {path}", highlight=False, markup=False, soft_wrap=True)


CURVE_TRAINING = ("epochs", "lr", "weight_decay", "batch_size", "warmup_steps", "standardize", "views", "solver", "layer")


def _given(ctx: typer.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` given on the command line (not left at their defaults), as flags."""
    sources = {n: ctx.get_parameter_source(n) for n in names}  # by name: typer carries its own copy of click's enum
    return [f"--{n.replace('_', '-')}" for n, source in sources.items()
            if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")]


ledger_app = typer.Typer(help="Check the results ledger, or recover what a damaged one still holds.", no_args_is_help=True,
                         add_completion=False)
app.add_typer(ledger_app, name="ledger")
LedgerFile = Annotated[Path | None, typer.Option("--ledger", help="Results ledger.", show_default="$MEDFM_OUTPUT/runs/results.sqlite")]


@ledger_app.command("check")
def ledger_check(ledger: LedgerFile = None) -> None:
    """SQLite's integrity check of the ledger, read-only (safe while runs write to it): ok, or the problems and exit 1."""
    from ledger.repair import check
    from ledger.store import default_ledger_path

    path = ledger or default_ledger_path()
    problems = check(path)
    if not problems:
        console.print(f"{path}: ok", highlight=False, markup=False, soft_wrap=True)
        return
    for line in problems:
        console.print(f"{path}: {line}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"{len(problems)} problem(s); `probe ledger recover --ledger {path}` writes what still reads into a copy beside it",
                  highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


@ledger_app.command("recover")
def ledger_recover(ledger: LedgerFile = None) -> None:
    """Merge the rows waiting in <ledger>.pending/; of a damaged ledger, write what still reads into a copy beside it and
    leave the damaged file as it is."""
    from ledger.repair import recover
    from ledger.store import default_ledger_path

    console.print(recover(ledger or default_ledger_path()).line(), highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    run_cli(app, "probe", interrupted="interrupted; finished runs are kept in the ledger, and the same command skips them "
                                      "and trains the rest")
