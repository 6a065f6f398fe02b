"""Where each cell of a grid stands, from the ledger and the grid folder's job files (docs/grid.md §6).

A cell is done when the ledger holds its run, whoever trained it; otherwise the job that completes it says the rest:
running (where), failed (its log's last line, or the dependency that failed), or pending (what it waits for).
Every executor records jobs the same way (`grid.state.run_job`), so this works for local and SLURM grids alike.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from grid.jobs import Job
from grid.plan import done_cells, read_spec
from grid.state import read_job, read_state


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
    by_cell = {cell: job for job in jobs.values() for cell in job.cells}
    out = []
    for cell in cells:
        job = by_cell.get(cell.key)
        if cell.key in done:
            out.append(CellStatus(cell.key, "done", job.name if job else "", ""))
        elif job is None:
            out.append(CellStatus(cell.key, "pending", "", "not planned yet: `grid run` plans it"))
        else:
            out.append(_from_job(grid_dir, cell.key, job, jobs))
    return out


def _from_job(grid_dir: Path, cell: str, job: Job, jobs: dict[str, Job]) -> CellStatus:
    state = read_state(grid_dir, job.name)
    if state["state"] == "running":
        where = f"on {state.get('host', '?')}" + (f", SLURM job {state['slurm_job']}" if state.get("slurm_job") else "")
        return CellStatus(cell, "running", job.name, where)
    if state["state"] == "failed":
        return CellStatus(cell, "failed", job.name, state.get("last") or f"exit {state.get('rc')}")
    if state["state"] == "done":  # the job ended well but the ledger has no such run (other settings, or removed)
        return CellStatus(cell, "pending", job.name, "its job finished without this run in the ledger; `grid run` plans it again")
    waiting = [d for d in job.after if d in jobs and read_state(grid_dir, d)["state"] != "done"]
    queued = [f"queued as SLURM job {state['slurm_job']}"] if state.get("slurm_job") else []
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
