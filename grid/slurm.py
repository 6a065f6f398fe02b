"""`grid run --executor slurm`: the planned jobs as SLURM jobs through submitit, their order as afterok dependencies
(docs/grid.md §5).

Every SLURM job runs `grid.state.run_job` on its node, the wrapper the local executor uses too, so a job's
state and log land in the grid folder (`logs/<name>.log`) whoever started it; submitit's own files (the
pickled call, its stdout and stderr) go to `<grid>/slurm/`. The grid folder, the outputs and the Python
environment must be on a file system the nodes share; sbatch passes this shell's environment on
(MEDFM_OUTPUT, MEDFM_WEIGHTS_DIR, ...).

Every job is submitted to begin a minute later (SLURM still checks its request on submission, which a held
job skips) and recorded as pending; once all were accepted they may start at once. So a refused sbatch
cancels the few submitted before it, none of them started, and a job's `running` never meets a late `pending`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import warnings
from collections.abc import Collection, Iterable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from submitit import SlurmExecutor
from submitit.core.utils import FailedJobError
from submitit.helpers import Checkpointable

from common.cli import one_line
from common.errors import MedfmError
from grid.jobs import Job
from grid.state import clear, last_line, log_path, mark, read_json, read_state, run_job, slurm_job_id

SLURM_FOLDER = "slurm"  # submitit's folder inside a grid folder
SUBMITTED = "submitted.json"  # in it: {job name: SLURM job id} of every submission, so a rerun does not queue a job twice
SLURM_TOOLS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
NATIVE_OPTIONS = ("partition", "account", "qos")  # `grid run` flags; every other --slurm-opt goes to sbatch as given
SBATCH_TIMEOUT_S = 60
STATUS_TIMEOUT_S = 20  # `grid status` waits no longer for each of sacct and squeue
DEFER_S = 60  # a submitted job begins no sooner, unless every job of the grid was accepted before
STOPPED_BY_SLURM = (128 + signal.SIGTERM, -signal.SIGTERM)  # a stage's exit code after SLURM's SIGTERM (requeue, scancel)


def submit(jobs: list[Job], grid_dir: Path, options: dict[str, str]) -> dict[str, str]:
    """Submit `jobs` (in dependency order, each after the ones it waits for) to SLURM: {job name: SLURM job id}.

    `options`: partition, account, qos and any other sbatch option (KEY=VALUE, dashes or underscores).
    A job whose earlier submission is still queued or running is not submitted again (its dependents wait
    on that one), so rerunning `grid run` after an interruption submits only what is missing.
    """
    grid_dir = Path(grid_dir)
    options = {key: value for key, value in options.items() if value}
    check_cluster(options.get("partition"))
    ids = queued(grid_dir, jobs)
    if ids:
        warnings.warn(f"{len(ids)} grid jobs are still queued or running on SLURM ({', '.join(sorted(ids.values()))}); "
                      "they are not submitted again", stacklevel=2)
    submitted: dict[str, str] = {}
    chatter = io.StringIO()  # submitit prints sbatch's stderr on a refusal; the error below says it in one line
    group: list[Job] = []
    try:
        with redirect_stdout(chatter), redirect_stderr(chatter):
            for group in batches(job for job in jobs if job.name not in ids):
                after = sorted({ids[name] for job in group for name in job.after if name in ids})
                for job, slurm_id in zip(group, _submit_deferred(group, after, grid_dir, options), strict=True):
                    ids[job.name] = submitted[job.name] = slurm_id
                    mark(grid_dir, job.name, "pending", slurm_job=slurm_id)  # `grid status`: the SLURM job a cell waits on
    except BaseException as err:  # sbatch refused a job, or Ctrl-C, or anything else half-way: none of it stays queued
        if submitted:
            subprocess.run(["scancel", *submitted.values()], capture_output=True, timeout=SBATCH_TIMEOUT_S)
        for name in submitted:
            clear(grid_dir, name)
        if not isinstance(err, FailedJobError):
            raise
        reason = "; ".join(line.strip().removeprefix("sbatch: error: ") for line in str(err).splitlines() if line.strip())
        raise MedfmError(f"sbatch refused grid job {group[0].name}: {reason or 'no reason given'}; nothing was submitted") from err
    _record(grid_dir, submitted)
    for name, slurm_id in ids.items():
        if name not in submitted and read_state(grid_dir, name)["state"] == "pending":  # still queued from an earlier run
            mark(grid_dir, name, "pending", slurm_job=slurm_id)
    if submitted and "begin" not in options:
        _slurm(["scontrol", "update", f"JobId={','.join(sorted({i.split('_')[0] for i in submitted.values()}))}", "StartTime=now"])
    return submitted


class GridJob(Checkpointable):
    """What a SLURM job runs: one planned grid job, through `run_job`, failing (so `afterok` holds back) if it fails.

    On preemption or timeout submitit calls `checkpoint` (Checkpointable's: the same call again) and requeues
    the job; a finetune job carries `--resume`, so it continues from its last epoch's checkpoint.
    """

    def __init__(self, grid_dir: Path, name: str) -> None:
        self.grid_dir = str(grid_dir)
        self.name = name

    def __call__(self) -> None:
        grid_dir = Path(self.grid_dir)
        rc = run_job(grid_dir, self.name)
        if rc in STOPPED_BY_SLURM:  # requeued, preempted or cancelled: not the job's fault; the next run goes on
            mark(grid_dir, self.name, "pending", slurm_job=slurm_job_id(), last=last_line(log_path(grid_dir, self.name)))
        if rc != 0:
            raise RuntimeError(f"grid job {self.name} failed with exit code {rc}; see {log_path(grid_dir, self.name)}")


def check_cluster(partition: str | None) -> None:
    """SLURM's commands are installed, its controller answers and `partition` exists, before anything is submitted."""
    for tool in SLURM_TOOLS:
        if shutil.which(tool) is None:
            raise MedfmError(f"{tool} is not on PATH: install SLURM's client commands on this machine, or use --executor local")
    partitions = _slurm(["sinfo", "--all", "--noheader", "--format=%R"]).split()
    if partition and partition not in partitions:
        raise MedfmError(f"SLURM partition {partition!r} does not exist; partitions here: {', '.join(sorted(set(partitions)))}")


def queued(grid_dir: Path, jobs: Iterable[Job]) -> dict[str, str]:
    """{name: SLURM job id} of the `jobs` that an earlier `submit` of this grid left in the queue (pending or running)."""
    record = grid_dir / SLURM_FOLDER / SUBMITTED
    earlier = read_json(record, "the SLURM ids of submitted jobs", f"remove it (`rm {record}`) and check `squeue --me`", {})
    mine = {job.name: earlier[job.name] for job in jobs if job.name in earlier}
    if not mine:
        return {}
    alive = set(_slurm(["squeue", "--me", "--array", "--noheader", "--format=%i"]).split())
    return {name: slurm_id for name, slurm_id in mine.items() if slurm_id in alive}


def slurm_states(ids: Collection[str]) -> dict[str, tuple[str, str]]:
    """{SLURM job id: (state, reason)} of those of `ids` SLURM knows, e.g. ("CANCELLED", "DependencyNeverSatisfied").

    sacct answers for every job of a cluster that keeps accounting; elsewhere squeue answers for the jobs ended
    no longer ago than the cluster's MinJobAge. Neither answering (not on PATH, no controller) is a MedfmError.
    """
    if not ids:
        return {}
    joined = ",".join(sorted(ids))
    said = []
    for command in (["sacct", "-n", "-P", "-X", "-j", joined, "-o", "JobID,State,Reason"],
                    ["squeue", "-h", "-r", "-t", "all", "-j", joined, "-o", "%i|%T|%r"]):
        try:  # SLURM_BITSTR_LEN=0: a pending array's task ranges in full, never cut at 64 characters
            done = subprocess.run(command, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S,
                                  env={**os.environ, "SLURM_BITSTR_LEN": "0"})
        except FileNotFoundError:
            said.append(f"{command[0]} is not on PATH")
            continue
        except subprocess.TimeoutExpired:
            said.append(f"{command[0]}: no answer within {STATUS_TIMEOUT_S} s")
            continue
        if done.returncode == 0 or "Invalid job id" in done.stderr:  # squeue's answer when it knows none of `ids`
            return parse_states(done.stdout)
        error = done.stderr.strip().splitlines()
        said.append(f"{command[0]}: {one_line(error[-1]) if error else f'exit code {done.returncode}'}")
    raise MedfmError(f"SLURM does not answer ({'; '.join(said)})")


def parse_states(text: str) -> dict[str, tuple[str, str]]:
    """sacct's `-P -o JobID,State,Reason` or squeue's `-o %i|%T|%r` lines as {id: (state, reason)}, one entry per array task
    (sacct shows a pending array as `12_[0-3,7]`) and the state's first word (sacct says `CANCELLED by 1000`)."""
    out = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) < 3:
            continue
        job_id, state, reason = fields[:3]
        array = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
        tasks = [f"{array[1]}_{task}" for task in _task_ids(array[2])] if array else [job_id]
        out.update(dict.fromkeys(tasks, (state.partition(" ")[0], reason)))
    return out


def _task_ids(ranges: str) -> list[int]:
    """`0-3,7` -> [0, 1, 2, 3, 7]."""
    tasks: list[int] = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        tasks.extend(range(int(first), int(last or first) + 1))
    return tasks


def _record(grid_dir: Path, submitted: dict[str, str]) -> None:
    """Add `submitted` to the grid's record of SLURM ids (written whole: a reader never sees half of it)."""
    record = grid_dir / SLURM_FOLDER / SUBMITTED
    earlier = read_json(record, "the SLURM ids of submitted jobs", f"remove it (`rm {record}`) and check `squeue --me`", {})
    tmp = record.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**earlier, **submitted}, indent=1))
    tmp.replace(record)


def batches(jobs: Iterable[Job]) -> list[list[Job]]:
    """The jobs in submission order, probe jobs with the same dependencies and resources gathered into one batch
    (a SLURM job array); a batch sits where its first job was, which is after everything its jobs wait for."""
    order: list[list[Job]] = []
    arrays: dict[tuple, list[Job]] = {}
    for job in jobs:
        if job.stage != "probe":
            order.append([job])
            continue
        key = (frozenset(job.after), job.resources)
        if key in arrays:
            arrays[key].append(job)
        else:
            arrays[key] = [job]
            order.append(arrays[key])
    return order


def sbatch_parameters(group: list[Job], after: list[str], options: dict[str, str]) -> dict[str, object]:
    """submitit's SlurmExecutor parameters for a batch: its resources, the grid's options, deferred, after `after`."""
    first = group[0]
    resources = first.resources
    extra: dict[str, object] = {"begin": f"now+{DEFER_S}"}
    if after:
        extra["kill_on_invalid_dep"] = "yes"  # a failed dependency cancels its dependents: a rerun submits them again
    extra.update({key: value for key, value in options.items() if key not in NATIVE_OPTIONS})
    name = "-".join(os.path.commonprefix([job.name.split("-") for job in group])) or first.stage  # an array: its jobs' common words
    return dict(
        job_name=name,
        time=resources.minutes,
        cpus_per_task=resources.cpus,
        mem=f"{resources.mem_gb}GB",
        nodes=1,
        ntasks_per_node=1,  # one task; a multi-GPU job starts its own processes under torchrun
        gpus_per_node=resources.gpus or None,
        dependency=f"afterok:{':'.join(after)}" if after else None,
        additional_parameters=extra,
        **{key: options[key] for key in NATIVE_OPTIONS if key in options},
    )


def _submit_deferred(group: list[Job], after: list[str], grid_dir: Path, options: dict[str, str]) -> list[str]:
    """Submit one batch, to begin in DEFER_S (one job, or a job array); its SLURM ids in the batch's order."""
    executor = SlurmExecutor(folder=grid_dir / SLURM_FOLDER)
    executor.update_parameters(**sbatch_parameters(group, after, options))
    return [job.job_id for job in executor.submit_array([GridJob(grid_dir, job.name) for job in group])]


def _slurm(command: list[str]) -> str:
    """A SLURM client command's stdout; a controller that does not answer is one clear error."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess(command, 1, "", f"no answer within {SBATCH_TIMEOUT_S} s")
    if done.returncode != 0:
        said = one_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}")
        raise MedfmError(f"the SLURM controller does not answer ({command[0]}: {said}); "
                         "check that slurmctld runs and SLURM_CONF points at its slurm.conf")
    return done.stdout
