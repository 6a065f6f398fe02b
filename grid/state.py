"""Where a grid keeps its jobs and what became of them, shared by every executor and `grid status`.

A grid folder holds `jobs/<name>.json` (the job, as planned), `state/<name>.json` (pending is its absence;
then running, done or failed, written by the job itself) and `logs/<name>.log`. Every executor starts a job
the same way, `run_job(grid_dir, name)` (here or on a cluster node), so a job's state and log never depend
on who launched it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.errors import MedfmError
from grid.jobs import Job, Resources

STATES = ("pending", "running", "done", "failed")


def write_jobs(jobs: list[Job], grid_dir: Path) -> None:
    """Record the planned jobs, so a job can be started by name on any node that sees `grid_dir`."""
    (grid_dir / "jobs").mkdir(parents=True, exist_ok=True)
    for job in jobs:
        _write_json(grid_dir / "jobs" / f"{job.name}.json", asdict(job))


def read_json(path: Path, what: str, fix: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """A grid file a user may edit or a crash may damage, read as a JSON object: `default` when it does not exist (if
    given), else one line naming the file, what is wrong with it and `fix`, never a traceback."""
    if default is not None and not path.exists():
        return default
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = "is a folder, not a file" if path.is_dir() else f"cannot be read as JSON ({str(err).splitlines()[0][:80]})"
        raise MedfmError(f"{path} ({what}) {problem}; {fix}") from None
    if not isinstance(data, dict):
        raise MedfmError(f"{path} ({what}) holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_job(grid_dir: Path, name: str) -> Job:
    path = grid_dir / "jobs" / f"{name}.json"
    fix = "run `grid run` again to plan the grid anew (finished cells are kept: the ledger holds them)"
    data = read_json(path, f"the planned job {name}", fix)
    try:
        return Job(name=data["name"], stage=data["stage"], args=tuple(data["args"]), after=tuple(data["after"]),
                   resources=Resources(**data["resources"]), cells=tuple(data["cells"]))
    except (KeyError, TypeError) as err:
        raise MedfmError(f"{path} (the planned job {name}) lacks or mangles {err}; {fix}") from None


def state_path(grid_dir: Path, name: str) -> Path:
    return grid_dir / "state" / f"{name}.json"


def read_state(grid_dir: Path, name: str) -> dict[str, Any]:
    """The job's last recorded state: {"state": pending|running|done|failed, ...}."""
    path = state_path(grid_dir, name)
    data = read_json(path, f"the state of job {name}", f"remove it (`rm {path}`): the job then counts as pending and runs again",
                     {"state": "pending"})
    if data.get("state") not in STATES:
        raise MedfmError(f"{path} (the state of job {name}) names no state ({', '.join(STATES)}); remove it (`rm {path}`): "
                         "the job then counts as pending and runs again")
    return data


def clear(grid_dir: Path, name: str) -> None:
    """Back to pending (no state file): a job planned again does not show its last run's end until it runs."""
    state_path(grid_dir, name).unlink(missing_ok=True)


def mark(grid_dir: Path, name: str, state: str, **fields: Any) -> None:
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}")
    state_path(grid_dir, name).parent.mkdir(parents=True, exist_ok=True)
    _write_json(state_path(grid_dir, name), {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})


def log_path(grid_dir: Path, name: str) -> Path:
    return grid_dir / "logs" / f"{name}.log"


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a failed job said last), or ""."""
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_job(grid_dir: Path, name: str, env: dict[str, str] | None = None) -> int:
    """Run one planned job to its end, recording running -> done|failed and appending its output to its log."""
    grid_dir = Path(grid_dir)
    job = read_job(grid_dir, name)
    if not Path(job.command()[0]).is_file():
        raise MedfmError(f"job {name}: medfm's command {job.command()[0]} is not installed beside this Python; "
                         "install medfm into this environment (pip install -e .)")
    log = log_path(grid_dir, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    where = {"host": socket.gethostname(), "slurm_job": slurm_job_id()}
    with log.open("a") as out:
        out.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(job.command())}\n")
        out.flush()
        proc = subprocess.Popen(job.command(), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        started = time.time()  # seconds since the epoch: the order of jobs, finer than `time`
        mark(grid_dir, name, "running", pid=proc.pid, started=started, **where)
        rc = proc.wait()
    ran = {"started": started, "ended": time.time(), **where}
    if rc == 0:
        mark(grid_dir, name, "done", rc=0, **ran)
    else:
        mark(grid_dir, name, "failed", rc=rc, last=last_line(log), **ran)
    return rc


def slurm_job_id() -> str:
    """This process's SLURM job as `squeue` and `scancel` name it: `<array>_<task>` for a job array's task, else the id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Whole or not at all: a reader never sees half a file."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
