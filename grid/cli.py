"""`grid`: the study's grid as a job graph, run here (`--executor local`) or on SLURM, and watched (`grid status`)."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.cli import parse_options, run_cli
from common.errors import MedfmError
from common.locks import acquire
from common.runtime import OUTPUT_ENV, output_root
from common.study import BACKBONE_SETS
from grid.estimate import CARD, option, sizes
from grid.jobs import STAGES
from grid.plan import (
    ADAPTER_SCENARIOS,
    DEFAULT_RESOURCES,
    SCENARIOS,
    STUDY_DATASETS,
    GridSpec,
    Plan,
    check_not_running,
    parse_resources,
    plan,
    reset_ended,
    write_spec,
)
from grid.state import write_jobs

app = typer.Typer(help="Run the study's grid (backbones x datasets x scenarios x seeds) as jobs with dependencies, and watch it.",
                  no_args_is_help=True, add_completion=False)
console = Console(highlight=False)
EXECUTORS = ("local", "slurm")
GridDir = Annotated[Path | None, typer.Option("--grid", help="The grid's folder: its spec, jobs, their states and logs.",
                                              show_default="$MEDFM_OUTPUT/grid")]
DEFAULTS_SHOWN = "; ".join(f"{kind} gpus={r.gpus} cpus={r.cpus} mem_gb={r.mem_gb} minutes={r.minutes}" for kind, r in DEFAULT_RESOURCES.items())


@app.command()
def run(
    backbones: Annotated[str, typer.Option(help="Backbones, comma- or space-separated, mixed freely: registry rows (`extract backbones`), "
                                                "library models (timm:NAME, open_clip:ARCH@TAG, hf:ID) and the sets "
                                                f"{', '.join(BACKBONE_SETS)} (their rows).")] = "study",
    datasets: Annotated[str, typer.Option(help="Datasets, comma- or space-separated (see `extract datasets`).")] = ",".join(STUDY_DATASETS),
    scenarios: Annotated[str, typer.Option(help=f"Scenarios, comma-separated, among the study's {', '.join(SCENARIOS)} and the "
                                                f"adapter extensions {', '.join(ADAPTER_SCENARIOS)}.")] = ",".join(SCENARIOS),
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated: one cell each.")] = "0",
    protocol: Annotated[str, typer.Option(help="study (every cell as the official code ran it: frozen linear heads on augmented "
                                               "cached views, frozen DeiT heads on live images) | medfm (medfm's own rules: frozen "
                                               "cells on one cached eval view, far cheaper, not the study's).")] = "study",
    data: Annotated[Path | None, typer.Option(help="Folder with one folder per dataset in its released layout (--root DATA/<dataset>).",
                                              show_default="none: no --root, as the demo dataset needs")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs of every cell (and the augmented views of a study extraction).")] = 100,
    null: Annotated[int | None, typer.Option(help="Null backbones: each backbone's cached cells again on K draws of random weights "
                                           "(`extract run --weights random:k`, k = 1..K); the report marks every cell that is not "
                                           "above its backbone's null.", show_default="none")] = None,
    extract_args: Annotated[str, typer.Option(help="Extra options of every `extract run`, e.g. '--batch-size 128'.", show_default="none")] = "",
    probe_args: Annotated[str, typer.Option(help="Extra options of every `probe sweep`.", show_default="none")] = "",
    finetune_args: Annotated[str, typer.Option(help="Extra options of every `finetune run`, e.g. '--workers 8'.", show_default="none")] = "",
    resources: Annotated[list[str] | None, typer.Option(help="What a kind of job asks of a node, KIND:KEY=VALUE (repeatable), KIND one of "
                                                             f"{', '.join(STAGES)}, KEY gpus|cpus|mem_gb|minutes; gpus above 1 runs torchrun.",
                                                        show_default=DEFAULTS_SHOWN)] = None,
    executor: Annotated[str, typer.Option(help="local (this machine: one job per free GPU, or the CPU) | slurm (submit to SLURM).")] = "local",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (cells, jobs, estimated GPU-hours) and run nothing.",
                                                 show_default="off")] = False,
    print_commands: Annotated[bool, typer.Option("--print-commands", help="Also print each planned job's command, dependencies first.",
                                                        show_default="off")] = False,
    max_jobs: Annotated[int | None, typer.Option(help="Local executor: jobs at once.", show_default="one per GPU; 1 on the CPU")] = None,
    grid: GridDir = None,
    partition: Annotated[str | None, typer.Option(help="SLURM partition.", show_default="the cluster's default")] = None,
    account: Annotated[str | None, typer.Option(help="SLURM account.", show_default="the cluster's default")] = None,
    qos: Annotated[str | None, typer.Option(help="SLURM quality of service.", show_default="the cluster's default")] = None,
    slurm_opt: Annotated[list[str] | None, typer.Option(help="Any other sbatch option, KEY=VALUE (repeatable), e.g. constraint=a100.",
                                                        show_default="none")] = None,
    override: Annotated[list[str] | None, typer.Option(
        help="Backbone constructor KEY=VALUE for extract and finetune (repeatable); for tiny test models.", hidden=True)] = None,
) -> None:
    """Plan the grid's missing cells as jobs (extraction, then the probe sweep of its cache; finetunes alone) and run them."""
    if executor not in EXECUTORS:
        raise MedfmError(f"--executor must be local or slurm, got '{executor}'")
    if null is not None and null < 1:
        raise MedfmError(f"--null is the number of random-weight draws per backbone, 1 or more (leave it out for none), got {null}")
    spec = GridSpec(
        backbones=_names(backbones), datasets=_names(datasets), scenarios=_names(scenarios), seeds=_seeds(seeds), protocol=protocol,
        data_root=str(data.resolve()) if data is not None else None, epochs=epochs, extract_args=_args(extract_args, "--extract-args"),
        probe_args=_args(probe_args, "--probe-args"), finetune_args=_args(finetune_args, "--finetune-args"),
        overrides=tuple(override or ()), resources=parse_resources(resources or []), output=str(output_root().resolve()), null=null or 0,
    )
    spec.validate()  # a mistake is one line before the grid's folder is touched
    grid_dir = (grid or output_root() / "grid").resolve()
    slurm_options = {k: v for k, v in (("partition", partition), ("account", account), ("qos", qos)) if v is not None}
    slurm_options.update(parse_options(slurm_opt or [], "--slurm-opt"))
    if dry_run:
        _show(plan(spec, grid_dir), print_commands)
        return
    submit = _slurm_submit() if executor == "slurm" else None  # not installed: one line, before anything is written
    with acquire(grid_dir / "run", f"the grid {grid_dir}"):
        the_plan = plan(spec, grid_dir)
        _show(the_plan, print_commands)
        if not the_plan.jobs:
            console.print(f"nothing to run: all {len(the_plan.cells)} cells are done")
            return
        if submit is None:  # SLURM's executor knows which of its jobs are still queued or running, and skips them
            check_not_running(grid_dir, the_plan.jobs)
        write_spec(spec, grid_dir)
        write_jobs(the_plan.jobs, grid_dir)
        reset_ended(grid_dir, the_plan.jobs)
        if submit is not None:
            ids = submit(the_plan.jobs, grid_dir, slurm_options)
            console.print(f"submitted {len(ids)} SLURM jobs; watch them with `grid status --grid {grid_dir}`", soft_wrap=True)
            return
        from grid.local import run_local, visible_gpus

        gpus = visible_gpus()
        console.print(f"running {len(the_plan.jobs)} jobs " + (f"on GPUs {','.join(gpus)}" if gpus else "on the CPU"))
        failed = run_local(the_plan.jobs, grid_dir, {OUTPUT_ENV: spec.output}, gpus=gpus, max_jobs=max_jobs,
                           say=lambda line: console.print(line, markup=False, soft_wrap=True))
    if failed:
        typer.echo(f"error: {len(failed)} grid jobs failed: {', '.join(failed)}; see `grid status --grid {grid_dir}` "
                   f"and {grid_dir / 'logs'}", err=True)
        raise typer.Exit(1)
    console.print(f"grid done: {len(the_plan.cells)} cells; `probe report` tabulates them", soft_wrap=True)


@app.command()
def status(grid: GridDir = None) -> None:
    """Each cell of the grid: done, running (which job, where), failed (the log's last line) or pending; then the counts."""
    from grid.status import grid_status, summary

    statuses = grid_status((grid or output_root() / "grid").resolve())
    table = Table("cell", "state", "job", "detail", title="grid status")
    colour = {"done": "green", "running": "cyan", "failed": "red", "pending": "yellow"}
    for s in statuses:
        table.add_row(s.cell, f"[{colour[s.state]}]{s.state}[/]", s.job, s.detail.replace("[", r"\["))
    console.print(table)
    console.print(summary(statuses))


def _show(the_plan: Plan, print_commands: bool) -> None:
    """Cells, jobs by kind, estimated GPU-hours by kind and by backbone (and, if asked, every job's command)."""
    spec = the_plan.spec
    console.print(f"grid: {len(the_plan.cells)} cells ({_count(spec.backbones, 'backbone')} x {_count(spec.datasets, 'dataset')} x "
                  f"{_count(spec.scenarios, 'scenario')} x {_count(spec.seeds, 'seed')}"
                  + (f", and the cached ones on {_count(range(spec.null), 'null backbone')}" if spec.null else "")
                  + f", protocol {spec.protocol}, {spec.epochs} epochs): "
                  f"{len(the_plan.done)} done, {len(the_plan.missing)} to run", soft_wrap=True)
    kinds = Counter(job.stage for job in the_plan.jobs)
    console.print(f"jobs: {len(the_plan.jobs)} ({', '.join(f'{kinds[k]} {k}' for k in STAGES)})", soft_wrap=True)
    hours = {k: sum(the_plan.hours[j.name] or 0.0 for j in the_plan.jobs if j.stage == k) for k in STAGES}
    unknown = sum(1 for j in the_plan.jobs if the_plan.hours[j.name] is None)
    console.print(f"estimated GPU-hours: {sum(hours.values()):.1f} ({', '.join(f'{k} {hours[k]:.1f}' for k in STAGES)}) on one "
                  f"{CARD.name} at {CARD.sustained_tflops:g} TFLOP/s sustained; an estimate from each model's counted FLOPs "
                  "(docs/grid.md §7), not a measurement" + (f"; {unknown} jobs not counted" if unknown else ""), soft_wrap=True)
    for backbone, cost in the_plan.costs.items():
        spent = sum(the_plan.hours[j.name] or 0.0 for j in the_plan.jobs if option(j.args, "--backbone") == backbone)
        console.print(f"  {backbone}: {cost.flops / 1e9:.1f} GFLOPs per image at {cost.image_size} px, {spent:.1f} GPU-hours",
                      soft_wrap=True, markup=False)
    for backbone, why in the_plan.uncounted.items():
        console.print(f"  {backbone}: no estimate, {why}", soft_wrap=True, markup=False)
    unsized = [d for d in spec.datasets if sizes(d) is None]
    if unsized:
        console.print(f"  {', '.join(unsized)}: no estimate, data of unknown size", soft_wrap=True, markup=False)
    if print_commands:
        for job in the_plan.jobs:
            print(shlex.join(job.command("python")))


def _slurm_submit():  # noqa: ANN202 - grid.slurm.submit, typed there
    """`grid.slurm.submit`, imported on use (submitit loads only for SLURM); its absence, or submitit's, is one line."""
    try:
        from grid import slurm
    except ImportError as err:
        raise MedfmError(f"the slurm executor is not installed here ({err}); use --executor local") from None
    return slurm.submit


def _count(values: Sequence, noun: str) -> str:
    return f"{len(values)} {noun}{'' if len(values) == 1 else 's'}"


def _names(text: str) -> tuple[str, ...]:
    """`deit,dino` or `deit dino` (as make passes STUDY_BACKBONES) -> ("deit", "dino"), a name given twice once."""
    return tuple(dict.fromkeys(text.replace(",", " ").split()))


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _names(text))
    except ValueError:
        raise MedfmError(f"--seeds takes comma-separated whole numbers such as 0,1,2, got '{text}'") from None


def _args(text: str, flag: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as err:
        raise MedfmError(f"{flag} is not a valid option string ({err}): '{text}'") from None


def main() -> None:
    run_cli(app, "grid", interrupted="interrupted; the running jobs were stopped: rerun `grid run` to continue where they were")
