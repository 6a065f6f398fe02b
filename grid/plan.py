"""The study's grid as cells and jobs: what to run, in which order, and what is already done (docs/grid.md §1, §2, §3).

A cell is one result the report shows: (scenario, backbone, dataset, seed). Cells become stage commands, the
ones `make paper` always ran: one extraction per (backbone, dataset), the heads of that cache in one `probe
sweep` after it, and each end-to-end cell as its own `finetune run`. Completed work is read from the ledger
(cells) and the grid folder (extractions), so a rerun plans only what is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cache.layout import backbone_folder, find_cache
from cache.schema import check_protocol
from common.cli import parse_options
from common.errors import MedfmError
from common.registry import unknown
from common.study import GRAYSCALE_DATASETS, STUDY_BACKBONES, STUDY_DATASETS
from extract.names import check_dataset
from grid import estimate
from grid.jobs import STAGES, Job, Resources, ordered
from grid.names import check_backbones, expand_backbones
from grid.state import clear, read_job, read_json, read_state, state_path
from ledger.records import ADAPTERS
from ledger.store import Ledger

SCENARIOS = ("frozen-linear", "frozen-deit", "unfrozen-linear", "unfrozen-deit")
# cells a grid may also hold: an adapter in the frozen backbone, its own recipe (docs/protocol.md §9), never in the default grid
ADAPTER_SCENARIOS = tuple(f"{method}-{head}" for method in ADAPTERS for head in ("linear", "deit"))
DEFAULT_RESOURCES = {
    "extract": Resources(gpus=1, cpus=8, mem_gb=32, minutes=240),
    "probe": Resources(gpus=1, cpus=4, mem_gb=32, minutes=120),
    "finetune": Resources(gpus=1, cpus=8, mem_gb=32, minutes=1440),
}
SPEC_FILE = "grid.json"  # the grid's spec, in its folder: what `grid status` expands into cells


@dataclass(frozen=True)
class Cell:
    """One result of the grid: a scenario of a backbone on a dataset, with one seed."""

    scenario: str
    backbone: str
    dataset: str
    seed: int
    null: int = 0  # a null backbone's draw of random weights (`--null K`: 1..K), 0 for the backbone itself

    @property
    def key(self) -> str:
        """The cell's name in a job's `cells` and in `grid status`."""
        return f"{self.scenario}/{self.backbone}/{self.dataset}/seed{self.seed}" + (f"/null{self.null}" if self.null else "")

    @property
    def head(self) -> str:
        return self.scenario.split("-")[1]

    @property
    def frozen(self) -> bool:
        return self.scenario.startswith("frozen")

    @property
    def adapter(self) -> str | None:
        """The adapter method of an adapter cell (`lora-linear`: lora), else None."""
        method = self.scenario.split("-")[0]
        return method if method in ADAPTERS else None


@dataclass(frozen=True)
class GridSpec:
    """Everything that decides a grid's cells and commands; the defaults are the study's 128 cells."""

    backbones: tuple[str, ...] = STUDY_BACKBONES
    datasets: tuple[str, ...] = STUDY_DATASETS
    scenarios: tuple[str, ...] = SCENARIOS
    seeds: tuple[int, ...] = (0,)
    protocol: str = "study"
    data_root: str | None = None  # one folder per dataset under it; None: no --root (the demo dataset)
    epochs: int = 100
    extract_args: tuple[str, ...] = ()  # appended to every command of the stage
    probe_args: tuple[str, ...] = ()
    finetune_args: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # backbone constructor KEY=VALUE for extract and finetune (tiny test models)
    resources: dict[str, Resources] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    output: str = "outputs"  # the stages' $MEDFM_OUTPUT: caches, runs and the ledger
    null: int = 0  # null backbones: each backbone's cached cells again on K draws of random weights (`--weights random:k`)

    def __post_init__(self) -> None:
        """Set words (`study`, `2025`, `medical`) become their rows here, so the spec's file and cells hold only backbones."""
        object.__setattr__(self, "backbones", expand_backbones(self.backbones))

    def validate(self) -> None:
        """Every name known and every number sane, before anything is planned or run (one line otherwise)."""
        for flag, values in (("--backbones", self.backbones), ("--datasets", self.datasets), ("--scenarios", self.scenarios),
                             ("--seeds", self.seeds)):
            if not values:
                raise MedfmError(f"{flag} needs at least one value")
        check_backbones(self.backbones)
        for name in self.datasets:
            check_dataset(name)
        for name in self.scenarios:
            if name not in SCENARIOS + ADAPTER_SCENARIOS:
                raise unknown("scenario", name, SCENARIOS + ADAPTER_SCENARIOS)
        if self.protocol == "fast":
            raise MedfmError("--protocol fast is now --protocol medfm (medfm's own rules: frozen cells on one cached eval view), "
                             "the word every stage uses")
        check_protocol(self.protocol)
        others = [d for d in self.datasets if d not in STUDY_DATASETS]
        if self.protocol == "study" and others:
            raise MedfmError(f"--protocol study runs on the study's datasets ({', '.join(STUDY_DATASETS)}) and their inputs; "
                             f"use --protocol medfm for {', '.join(others)}")
        if self.epochs < 1:
            raise MedfmError(f"--epochs must be at least 1, got {self.epochs}")
        if self.null < 0:
            raise MedfmError(f"--null is a number of random-weight draws per backbone (0: none), got {self.null}")
        if any(seed < 0 for seed in self.seeds):
            raise MedfmError(f"--seeds must be whole numbers of 0 or more, got {','.join(map(str, self.seeds))}")
        parse_options(list(self.overrides), "--override")

    def cells(self) -> list[Cell]:
        """Every cell, then the null backbones' cells: the scenarios trained on a cache, on each draw 1..null."""
        cells = [Cell(s, b, d, seed) for d in self.datasets for b in self.backbones for s in self.scenarios for seed in self.seeds]
        return cells + [replace(c, null=k) for k in range(1, self.null + 1) for c in cells if self.on_cache(c)]

    def on_cache(self, cell: Cell) -> bool:
        """Trained by `probe` on the extracted cache (else by `finetune` on live images). Under the study's protocol the
        frozen DeiT head trains on live augmented images, as token views of every epoch would take epochs x the disk."""
        return cell.scenario == "frozen-linear" or (self.protocol == "medfm" and cell.scenario == "frozen-deit")

    def stage(self, cell: Cell) -> str:
        return "probe" if self.on_cache(cell) else "finetune"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> GridSpec:
        data: dict[str, Any] = json.loads(text)
        resources = {kind: Resources(**r) for kind, r in data.pop("resources").items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}, resources=resources)


def parse_resources(pairs: list[str]) -> dict[str, Resources]:
    """`["extract:gpus=2", "finetune:minutes=2880"]` on top of the defaults; a kind or key that is not one is one line."""
    out = dict(DEFAULT_RESOURCES)
    for pair in pairs:
        kind, sep, setting = pair.partition(":")
        if not sep or kind not in STAGES:
            raise MedfmError(f"--resources expects KIND:KEY=VALUE with KIND one of {', '.join(STAGES)}, got '{pair}'")
        for key, value in parse_options([setting], "--resources").items():
            if key not in Resources.__dataclass_fields__:
                raise MedfmError(f"--resources {pair}: KEY must be one of {', '.join(Resources.__dataclass_fields__)}")
            if not value.isdigit() or (int(value) < 1 and key != "gpus"):
                raise MedfmError(f"--resources {pair}: {key} must be a whole number{' of 1 or more' if key != 'gpus' else ''}")
            out[kind] = replace(out[kind], **{key: int(value)})
    return out


# --- the commands of each job: those `make paper` ran per (backbone, dataset) for each protocol


def _live(spec: GridSpec, backbone: str, dataset: str) -> list[str]:
    """Options of a stage that reads the images: the dataset's folder and the study's inputs. Only the study's datasets
    have the study's normalisation constants; any other is normalised with its own train split's (`--norm dataset`)."""
    root = ["--root", str(Path(spec.data_root) / dataset)] if spec.data_root is not None else []
    norm = "study" if dataset in STUDY_DATASETS else "dataset"
    channels = ["--in-chans", "1"] if dataset in GRAYSCALE_DATASETS else []
    return ["--backbone", backbone, "--dataset", dataset, *root, "--norm", norm, "--interpolation", "bilinear", *channels]


def _overrides(spec: GridSpec) -> list[str]:
    return [arg for pair in spec.overrides for arg in ("--override", pair)]


def _protocol(spec: GridSpec) -> list[str]:
    return ["--protocol", "study"] if spec.protocol == "study" else []


def _null(null: int) -> str:
    return f"-null{null}" if null else ""


def extract_job(spec: GridSpec, backbone: str, dataset: str, null: int = 0) -> Job:
    """The extraction of one cache; of null draw `null` (>= 1), random weights of that draw whatever the stage options say."""
    views = [*_protocol(spec), "--views", str(spec.epochs), "--augment", "study", "--no-tokens"] if spec.protocol == "study" else []
    weights = ("--weights", f"random:{null}") if null else ()
    return Job(name=f"extract-{backbone_folder(backbone)}-{dataset}{_null(null)}", stage="extract",
               args=("run", *_live(spec, backbone, dataset), *views, *_overrides(spec), *spec.extract_args, *weights),
               resources=spec.resources["extract"])


def probe_job(spec: GridSpec, backbone: str, dataset: str, cells: list[Cell], after: tuple[str, ...], null: int = 0) -> Job:
    """The heads of one cache, every seed, in one `probe sweep` (it skips configurations the ledger holds)."""
    heads = ",".join(dict.fromkeys(c.head for c in cells))
    seeds = ",".join(str(s) for s in dict.fromkeys(c.seed for c in cells))
    draw = ("--backbone-seed", str(null)) if null else ()
    return Job(name=f"probe-{backbone_folder(backbone)}-{dataset}{_null(null)}", stage="probe",
               args=("sweep", "--head", heads, "--backbone", backbone, "--dataset", dataset, *draw, *_protocol(spec),
                     "--epochs", str(spec.epochs), "--seed", seeds, *spec.probe_args),
               after=after, resources=spec.resources["probe"], cells=tuple(c.key for c in cells))


def finetune_job(spec: GridSpec, cell: Cell) -> Job:
    freeze = ["--freeze", "all"] if cell.frozen else ["--adapter", cell.adapter] if cell.adapter else []
    return Job(name=f"finetune-{cell.scenario}-{backbone_folder(cell.backbone)}-{cell.dataset}-s{cell.seed}", stage="finetune",
               args=("run", "--head", cell.head, *freeze, *_live(spec, cell.backbone, cell.dataset), *_protocol(spec),
                     "--epochs", str(spec.epochs), "--resume", "--seed", str(cell.seed), *_overrides(spec), *spec.finetune_args),
               resources=spec.resources["finetune"], cells=(cell.key,))


# --- what is done already


def done_cells(spec: GridSpec, cells: list[Cell]) -> set[str]:
    """Keys of the cells the ledger holds a run of: same stage, scenario, backbone, dataset, seed, protocol and epochs
    (a linear head solved to convergence, medfm's default probe, has no epochs: any such run of the cell counts)."""
    path = Path(spec.output) / "runs" / "results.sqlite"
    if not path.exists():
        return set()
    rows = Ledger(path).rows(backbone=list(spec.backbones), dataset=list(spec.datasets), seed=list(spec.seeds))
    have = {(r.stage, r.scenario, r.backbone, r.dataset, r.seed, int(r.config.get("backbone_seed", 0))) for r in rows
            if r.config.get("protocol", "medfm") == spec.protocol
            and (r.config.get("epochs") == spec.epochs or r.config.get("solver") == "lbfgs")}
    return {c.key for c in cells if (spec.stage(c), c.scenario, c.backbone, c.dataset, c.seed, c.null) in have}


def extraction_done(spec: GridSpec, grid_dir: Path, job: Job, backbone: str, dataset: str, null: int = 0) -> bool:
    """This grid ran this very extraction to its end and its cache is there (found as `probe` finds it), all without
    building a model: a changed command (other settings) or a missing cache means extracting again."""
    if read_state(grid_dir, job.name)["state"] != "done":
        return False
    try:
        if read_job(grid_dir, job.name).args != job.args:
            return False
        find_cache(backbone, dataset, features=Path(spec.output) / "features", backbone_seed=null)
    except (OSError, MedfmError):
        return False
    return True


def check_not_running(grid_dir: Path, jobs: list[Job]) -> None:
    """A job another launch is still running is not planned twice: one line naming it and where it runs."""
    for job in jobs:
        state = read_state(grid_dir, job.name)
        if state["state"] == "running" and _alive(state):
            where = f"host {state.get('host', '?')}" + (f", SLURM job {state['slurm_job']}" if state.get("slurm_job") else "")
            raise MedfmError(f"grid job {job.name} is still running ({where}); wait for it (`grid status`), or if it is gone, "
                             f"delete {state_path(grid_dir, job.name)} and rerun")


def reset_ended(grid_dir: Path, jobs: list[Job]) -> None:
    """Jobs planned again go back to pending: those that ended (done, failed) and those whose process died. A job
    queued or running elsewhere (SLURM) keeps its state: its executor knows it is still coming."""
    for job in jobs:
        state = read_state(grid_dir, job.name)
        if state["state"] in ("done", "failed") or (state["state"] == "running" and not _alive(state)):
            clear(grid_dir, job.name)


def _alive(state: dict[str, Any]) -> bool:
    """A job started on this machine outside SLURM is alive while its process is; elsewhere we cannot tell: alive."""
    if state.get("host") != socket.gethostname() or state.get("slurm_job") or "pid" not in state:
        return True
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the plan


@dataclass
class Plan:
    """The grid's cells, those done, and the jobs still to run (dependencies first), with each job's estimated GPU-hours."""

    spec: GridSpec
    cells: list[Cell]
    done: set[str]
    jobs: list[Job]
    hours: dict[str, float | None]  # job name -> estimated GPU-hours (None: data of unknown size, or an uncounted model)
    costs: dict[str, estimate.ModelCost] = field(default_factory=dict)  # backbone -> its counted cost per image
    uncounted: dict[str, str] = field(default_factory=dict)  # backbone -> why its FLOPs could not be counted

    @property
    def missing(self) -> list[Cell]:
        return [c for c in self.cells if c.key not in self.done]

    def cost(self, backbone: str, job: Job) -> estimate.ModelCost | None:
        """The backbone's cost at the input size of the stage command `job` (its --image-size, else the model's own),
        counted once; a model that cannot be counted is kept in `uncounted` and gets no estimate (nor another try)."""
        if backbone in self.uncounted:
            return None
        size = estimate.option(job.args, "--image-size")
        try:
            cost = estimate.count_model(backbone, int(size) if size and size.isdigit() else None, self.spec.overrides)
        except MedfmError as err:
            self.uncounted[backbone] = str(err)
            return None
        self.costs.setdefault(backbone, cost)
        return cost


def plan(spec: GridSpec, grid_dir: Path) -> Plan:
    """The jobs of the missing cells: a job whose cells are all done is dropped, and so is an extraction that no missing
    cell needs or that this grid completed already (its probe job then waits on nothing)."""
    spec.validate()
    cells = spec.cells()
    done = done_cells(spec, cells)
    the_plan = Plan(spec, cells, done, [], {})
    jobs, hours = the_plan.jobs, the_plan.hours
    for dataset in spec.datasets:
        for backbone, null in itertools.product(spec.backbones, range(spec.null + 1)):
            mine = [c for c in cells if c.backbone == backbone and c.dataset == dataset and c.null == null]
            on_cache = [c for c in mine if spec.on_cache(c)]
            if any(c.key not in done for c in on_cache):
                extraction = extract_job(spec, backbone, dataset, null)
                cached = the_plan.cost(backbone, extraction)  # the features the probe reads are the extraction's
                after: tuple[str, ...] = ()
                if not extraction_done(spec, grid_dir, extraction, backbone, dataset, null):
                    jobs.append(extraction)
                    views = spec.epochs if spec.protocol == "study" else 0
                    hours[extraction.name] = estimate.extraction_hours(cached, dataset, views)
                    after = (extraction.name,)
                probe = probe_job(spec, backbone, dataset, on_cache, after, null)
                jobs.append(probe)
                heads = tuple(dict.fromkeys(c.head for c in on_cache))
                hours[probe.name] = estimate.probe_hours(cached, dataset, heads, spec.epochs, len(spec.seeds))
            for cell in mine:
                if not spec.on_cache(cell) and cell.key not in done:
                    job = finetune_job(spec, cell)
                    jobs.append(job)
                    hours[job.name] = estimate.finetune_hours(the_plan.cost(backbone, job), dataset, cell.head, cell.frozen, spec.epochs,
                                                              adapter=cell.adapter is not None)
    the_plan.jobs = ordered(jobs)
    return the_plan


def read_spec(grid_dir: Path) -> GridSpec:
    path = grid_dir / SPEC_FILE
    if not path.exists():
        raise MedfmError(f"no grid in {grid_dir} (no {SPEC_FILE}); start one with `grid run` (or pass --grid DIR)")
    fix = "remove it and start the grid again with `grid run` (finished cells are kept: the ledger holds them)"
    data = read_json(path, "the grid's settings", fix)
    try:
        return GridSpec.from_json(json.dumps(data))
    except (KeyError, TypeError, AttributeError) as err:
        raise MedfmError(f"{path} (the grid's settings) lacks or mangles {err}; {fix}") from None


def write_spec(spec: GridSpec, grid_dir: Path) -> None:
    grid_dir.mkdir(parents=True, exist_ok=True)
    tmp = grid_dir / f"{SPEC_FILE}.tmp{os.getpid()}"
    tmp.write_text(spec.to_json())
    tmp.replace(grid_dir / SPEC_FILE)
