"""The local executor: a grid's jobs on this machine, one per free GPU slot, or on the CPU (docs/grid.md §4).

A job starts once every job it waits for is done, on GPUs no other job holds (its own `CUDA_VISIBLE_DEVICES`).
A failed job fails the jobs that wait on it, transitively, without running them; the rest of the grid goes on.
Each job runs through `grid.state.run_job`, as on a cluster, so `grid status` reads the same files either way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from common.errors import MedfmError
from grid.jobs import Job
from grid.state import mark, read_state, run_job


def visible_gpus() -> list[str]:
    """The GPUs this machine lets us use: CUDA_VISIBLE_DEVICES when set, else those `nvidia-smi -L` lists (no torch import)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(line for line in listing.stdout.splitlines() if line.startswith("GPU "))]


def run_local(jobs: list[Job], grid_dir: Path, env: dict[str, str], *, gpus: list[str], max_jobs: int | None = None,
              say: Callable[[str], None] = print) -> list[str]:
    """Run `jobs` (dependencies first, as `grid.jobs.ordered` gives them); returns the names of the failed ones.

    With GPUs each job takes `max(1, resources.gpus)` of them and at most `max_jobs` run at once (default: as many
    as fit); without, up to `max_jobs` (default 1) run on the CPU.
    """
    slots = max_jobs if max_jobs is not None else (len(gpus) if gpus else 1)
    if slots < 1:
        raise MedfmError(f"--max-jobs must be at least 1, got {slots}")
    need = {job.name: max(1, job.resources.gpus) if gpus else 1 for job in jobs}
    too_big = [job for job in jobs if gpus and need[job.name] > len(gpus)]
    if too_big:
        raise MedfmError(f"grid job {too_big[0].name} asks for {need[too_big[0].name]} GPUs and this machine has {len(gpus)}; "
                         f"lower it with --resources {too_big[0].stage}:gpus={len(gpus)}")
    if not gpus and any(job.resources.gpus > 1 for job in jobs):
        raise MedfmError("grid jobs ask for several GPUs (torchrun) and this machine has none; "
                         "use --resources KIND:gpus=1 for a CPU run")
    waiting = list(jobs)
    free = list(gpus)
    outcome: dict[str, bool] = {}  # name -> succeeded
    running: dict[Future[int], tuple[Job, list[str]]] = {}
    with ThreadPoolExecutor(max_workers=slots) as pool:
        try:
            while waiting or running:
                for job in list(waiting):
                    failed_dep = next((d for d in job.after if outcome.get(d) is False), None)
                    if failed_dep is not None:
                        mark(grid_dir, job.name, "failed", last=f"dependency {failed_dep} failed")
                        say(f"failed {job.name}: dependency {failed_dep} failed")
                        outcome[job.name] = False
                        waiting.remove(job)
                    elif all(outcome.get(d) for d in job.after) and len(running) < slots and (not gpus or need[job.name] <= len(free)):
                        held = [free.pop(0) for _ in range(need[job.name])] if gpus else []
                        child = {**env, "CUDA_VISIBLE_DEVICES": ",".join(held)}
                        running[pool.submit(run_job, grid_dir, job.name, child)] = (job, held)
                        waiting.remove(job)
                        say(f"started {job.name}" + (f" on GPU {','.join(held)}" if held else " on the CPU"))
                if not running:
                    break  # nothing runs and nothing can start: cannot happen for an ordered graph, but never spin
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    job, held = running.pop(future)
                    free.extend(held)
                    outcome[job.name] = future.result() == 0
                    state = read_state(grid_dir, job.name)
                    say(f"done {job.name}" if outcome[job.name] else f"failed {job.name} (exit {state.get('rc')}): {state.get('last', '')}")
        except BaseException:  # Ctrl-C or SIGTERM: stop the children, so that none outlives the grid
            _stop(grid_dir, [job for job, _ in running.values()])
            raise
    return [job.name for job in jobs if outcome.get(job.name) is False]


def _stop(grid_dir: Path, jobs: list[Job]) -> None:
    """SIGTERM to each running job's process (the stages stop cleanly on it and resume on the next run)."""
    for job in jobs:
        pid = read_state(grid_dir, job.name).get("pid")
        if pid is not None:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass
