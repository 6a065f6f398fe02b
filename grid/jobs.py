"""A grid job: one stage command with its resources and the jobs it waits for.

Executors (local GPU slots, SLURM) see only `Job`s: what to run (`command`), on what (`Resources`) and after
what (`after`). Each stage runs as its own process through its CLI, so a job on a cluster node runs exactly
what a user would type, and nothing of a stage is imported by the grid to run it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import MedfmError

STAGES = ("extract", "probe", "finetune")


@dataclass(frozen=True)
class Resources:
    """What one job asks of a node; `gpus > 1` runs the stage under torchrun, one process per GPU."""

    gpus: int = 0
    cpus: int = 2
    mem_gb: int = 8
    minutes: int = 60


@dataclass(frozen=True)
class Job:
    """One stage command of a grid (`<stage> <args...>`), named uniquely (a file name and a SLURM job name)."""

    name: str
    stage: str  # extract | probe | finetune
    args: tuple[str, ...]  # the stage's CLI arguments, e.g. ("run", "--backbone", "deit", ...)
    after: tuple[str, ...] = ()  # names of the jobs that must succeed first
    resources: Resources = field(default_factory=Resources)
    cells: tuple[str, ...] = ()  # the grid cells this job completes (empty for an extraction)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise MedfmError(f"job {self.name}: stage must be one of {', '.join(STAGES)}, got {self.stage!r}")

    def command(self, python: str = sys.executable) -> list[str]:
        """The process to start: the stage's installed console script by its absolute path beside `python`, under
        torchrun (`--no-python`) when the job has several GPUs. Never `python -m <stage>`, which imports from the
        working folder first: a file `extract.py` where a user starts the grid would run instead of medfm."""
        script = str(Path(python).parent / self.stage)
        if self.resources.gpus > 1:  # -I: torchrun's own launcher does not look in the working folder either
            return [python, "-I", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.resources.gpus}",
                    "--no-python", script, *self.args]
        return [script, *self.args]


def ordered(jobs: Sequence[Job]) -> list[Job]:
    """`jobs` with every job after the ones it waits for; a duplicate name, unknown dependency or cycle is an error."""
    by_name: dict[str, Job] = {}
    for job in jobs:
        if job.name in by_name:
            raise MedfmError(f"two grid jobs are named {job.name}")
        by_name[job.name] = job
    done: dict[str, bool] = {}  # name -> finished (False while on the current path)
    order: list[Job] = []

    def visit(job: Job) -> None:
        if done.get(job.name) is False:
            raise MedfmError(f"grid job {job.name} waits on itself through {', '.join(job.after)}")
        if job.name in done:
            return
        done[job.name] = False
        for name in job.after:
            if name not in by_name:
                raise MedfmError(f"grid job {job.name} waits on {name}, which is not in the grid")
            visit(by_name[name])
        done[job.name] = True
        order.append(job)

    for job in jobs:
        visit(job)
    return order
