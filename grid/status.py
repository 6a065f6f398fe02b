"""Where each cell of a grid stands, from the ledger and the grid folder's job files (docs/grid.md §6).

A cell is done when the ledger holds its run, whoever trained it; otherwise the job that completes it says the rest:
running (where), failed (its log's last line, or the dependency that failed), or pending (what it waits for).
Every executor records jobs the same way (`grid.state.run_job`), so this works for local and SLURM grids alike.
A queued or running SLURM job's state file is checked against SLURM itself, which may have ended the job without it
ever writing so (a dependency that failed, scancel, a lost node); `grid status` only reads, and writes nothing.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from grid.jobs import Job
from grid.plan import done_cells, read_spec
from grid.state import read_job, read_state

# SLURM's job states (squeue's and sacct's names) by what they make of a job whose state file says pending or running
SLURM_PENDING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD")
SLURM_RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING")
SLURM_FAILED = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


@dataclass(frozen=True)
class CellStatus:
    cell: str  # scenario/backbone/dataset/seedN
    state: str  # pending | running | done | failed
    job: str  # the job that completes it ("" when done by the ledger and no job was planned)
    detail: str  # where it runs, why it failed, what it waits for


def grid_status(grid_dir: Path) -> list[CellStatus]:
    """One line per cell of the grid in `grid_dir`, in the grid's order."""
    spec = read_spec(grid_dir)
    cells = spec.cells()
    done = done_cells(spec, cells)
    jobs = _jobs(grid_dir)
    slurm = _ask_slurm(grid_dir, jobs)
    by_cell = {cell: job for job in jobs.values() for cell in job.cells}
    out = []
    for cell in cells:
        job = by_cell.get(cell.key)
        if cell.key in done:
            out.append(CellStatus(cell.key, "done", job.name if job else "", ""))
        elif job is None:
            out.append(CellStatus(cell.key, "pending", "", "not planned yet: `grid run` plans it"))
        else:
            out.append(_from_job(grid_dir, cell.key, job, jobs, slurm))
    return out


def _ask_slurm(grid_dir: Path, jobs: dict[str, Job]) -> dict[str, tuple[str, str] | None]:
    """{SLURM job id: SLURM's (state, reason), None where SLURM no longer knows it} of the jobs whose state files say
    queued or running on SLURM; {} and one warning where SLURM cannot be asked (its commands missing or silent)."""
    ids = {state["slurm_job"] for state in (read_state(grid_dir, name) for name in jobs)
           if state["state"] in ("pending", "running") and state.get("slurm_job")}
    if not ids:
        return {}
    try:
        from grid.slurm import slurm_states  # submitit loads only for a grid with SLURM jobs

        known = slurm_states(ids)
    except (ImportError, MedfmError) as err:
        warnings.warn(f"SLURM did not say what became of {len(ids)} queued or running jobs: {err}; their rows show the grid "
                      "folder's state files only", stacklevel=2)
        return {}
    return {slurm_id: known.get(slurm_id) for slurm_id in ids}


def _as_slurm_says(state: dict[str, Any], slurm: dict[str, tuple[str, str] | None]) -> dict[str, Any]:
    """A pending or running job's state as SLURM has it, which the job cannot record when SLURM ended it before or
    without the job's wrapper (a failed dependency, scancel, a lost node, a time limit's kill); else `state` as it is."""
    slurm_id = state.get("slurm_job")
    if state["state"] not in ("pending", "running") or slurm_id not in slurm:
        return state
    said = slurm[slurm_id]
    if said is None:  # sacct keeps every job; squeue forgets an ended one after the cluster's MinJobAge
        gone = state["state"] == "pending"  # a queued job SLURM dropped never runs; a running job's own record stands
        return {**state, "state": "failed", "last": f"SLURM no longer knows job {slurm_id}"} if gone else state
    slurm_state, reason = said[0], "" if said[1] == "None" else said[1]
    if slurm_state in SLURM_PENDING:
        return {**state, "state": "pending", "slurm_reason": reason}
    if slurm_state in SLURM_RUNNING:
        return {**state, "state": "running"}
    if slurm_state in SLURM_FAILED:
        return {**state, "state": "failed", "last": f"SLURM: {slurm_state} {reason}".strip()}
    return state  # COMPLETED: the job's own `done` is on its way


def _from_job(grid_dir: Path, cell: str, job: Job, jobs: dict[str, Job], slurm: dict[str, tuple[str, str] | None]) -> CellStatus:
    state = _as_slurm_says(read_state(grid_dir, job.name), slurm)  # read after SLURM answered: a job that ended meanwhile says so
    if state["state"] == "running":
        where = [f"on {state['host']}"] if state.get("host") else []  # no host: SLURM started it, its wrapper has not said so yet
        where += [f"SLURM job {state['slurm_job']}"] if state.get("slurm_job") else []
        return CellStatus(cell, "running", job.name, ", ".join(where))
    if state["state"] == "failed":
        return CellStatus(cell, "failed", job.name, state.get("last") or f"exit {state.get('rc')}")
    if state["state"] == "done":  # the job ended well but the ledger has no such run (other settings, or removed)
        return CellStatus(cell, "pending", job.name, "its job finished without this run in the ledger; `grid run` plans it again")
    waiting = [d for d in job.after if d in jobs and read_state(grid_dir, d)["state"] != "done"]
    reason = f" ({state['slurm_reason']})" if state.get("slurm_reason") else ""  # SLURM's, e.g. Dependency, Priority, BeginTime
    queued = [f"queued as SLURM job {state['slurm_job']}{reason}"] if state.get("slurm_job") else []
    return CellStatus(cell, "pending", job.name, ", ".join(queued + ([f"waits for {', '.join(waiting)}"] if waiting else [])))


def _jobs(grid_dir: Path) -> dict[str, Job]:
    folder = grid_dir / "jobs"
    names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    out = {}
    for name in names:
        try:
            out[name] = read_job(grid_dir, name)
        except (OSError, json.JSONDecodeError, KeyError):
            continue  # a job file being rewritten right now: its cells show as not planned this once
    return out


def summary(statuses: list[CellStatus]) -> str:
    """`128 cells: 10 done, 2 running, 1 failed, 115 pending`."""
    counts = Counter(s.state for s in statuses)
    return f"{len(statuses)} cells: " + ", ".join(f"{counts[state]} {state}" for state in ("done", "running", "failed", "pending"))
