"""The local executor: dependencies first, one job per free GPU (or the CPU), a failure fails what waits on it."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest

from common.errors import MedfmError
from grid.jobs import Job, Resources
from grid.local import run_local, visible_gpus
from grid.state import read_state, write_jobs

HELP = ("--help",)  # a stage command that starts the real module and succeeds in about a second


def start(tmp_path: Path, jobs: list[Job], **options) -> tuple[Path, list[str]]:
    grid = tmp_path / "grid"
    write_jobs(jobs, grid)
    return grid, run_local(jobs, grid, {}, say=lambda line: None, **options)


@pytest.mark.slow
def test_a_probe_never_starts_before_its_extraction_ends(tmp_path: Path) -> None:
    jobs = [Job("extract-a", "extract", HELP), Job("probe-a", "probe", HELP, after=("extract-a",)),
            Job("finetune-b", "finetune", HELP)]
    grid, failed = start(tmp_path, jobs, gpus=[], max_jobs=3)
    states = {job.name: read_state(grid, job.name) for job in jobs}
    assert failed == [] and all(s["state"] == "done" for s in states.values())
    assert states["probe-a"]["started"] >= states["extract-a"]["ended"]
    assert states["finetune-b"]["started"] < states["extract-a"]["ended"]  # a job that waits on nothing runs beside it


@pytest.mark.slow
def test_a_failed_extraction_fails_its_dependents_unrun_and_the_rest_of_the_grid_goes_on(tmp_path: Path) -> None:
    jobs = [Job("extract-a", "extract", ("run", "--backbone", "nope", "--dataset", "demo")),
            Job("probe-a", "probe", HELP, after=("extract-a",)), Job("later-a", "probe", HELP, after=("probe-a",)),
            Job("finetune-b", "finetune", HELP)]
    grid, failed = start(tmp_path, jobs, gpus=[])
    assert failed == ["extract-a", "probe-a", "later-a"]
    assert read_state(grid, "extract-a")["last"].startswith("error: unknown backbone 'nope'")
    assert read_state(grid, "probe-a")["last"] == "dependency extract-a failed"
    assert read_state(grid, "later-a")["last"] == "dependency probe-a failed"
    assert not (grid / "logs" / "probe-a.log").exists() and read_state(grid, "finetune-b")["state"] == "done"


class FakeJobs:
    """Stands in for `grid.state.run_job`: records each job's GPUs and time span; `fail` names jobs that exit 1."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail, self.lock, self.spans = fail, threading.Lock(), {}

    def __call__(self, grid_dir: Path, name: str, env: dict[str, str]) -> int:
        began = time.monotonic()
        time.sleep(0.05)
        with self.lock:
            self.spans[name] = (env["CUDA_VISIBLE_DEVICES"], began, time.monotonic())
        return 1 if name in self.fail else 0


def test_each_job_gets_gpus_no_other_running_job_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeJobs()
    monkeypatch.setattr("grid.local.run_job", fake)
    two = Resources(gpus=2)
    jobs = [Job(f"finetune-{i}", "finetune", HELP) for i in range(4)] + [Job("extract-wide", "extract", HELP, resources=two)]
    _, failed = start(tmp_path, jobs, gpus=["0", "1", "2"])
    assert failed == [] and set(fake.spans) == {job.name for job in jobs}
    assert len(fake.spans["extract-wide"][0].split(",")) == 2
    for a, (gpus_a, start_a, end_a) in fake.spans.items():
        for b, (gpus_b, start_b, end_b) in fake.spans.items():
            if a < b and start_a < end_b and start_b < end_a:  # ran at the same time: no GPU shared
                assert not set(gpus_a.split(",")) & set(gpus_b.split(",")), (a, b)


def test_on_the_cpu_max_jobs_run_at_once_with_no_gpu_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeJobs()
    monkeypatch.setattr("grid.local.run_job", fake)
    start(tmp_path, [Job(f"probe-{i}", "probe", HELP) for i in range(3)], gpus=[], max_jobs=1)
    spans = sorted(fake.spans.values(), key=lambda s: s[1])
    assert all(s[0] == "" for s in spans) and all(earlier[2] <= later[1] for earlier, later in itertools.pairwise(spans))


def test_a_job_asking_more_gpus_than_the_machine_has_is_one_line_before_anything_runs(tmp_path: Path, monkeypatch) -> None:
    fake = FakeJobs()
    monkeypatch.setattr("grid.local.run_job", fake)
    with pytest.raises(MedfmError, match="asks for 4 GPUs and this machine has 2; lower it with --resources finetune:gpus=2"):
        start(tmp_path, [Job("probe-a", "probe", HELP), Job("finetune-a", "finetune", HELP, resources=Resources(gpus=4))], gpus=["0", "1"])
    assert fake.spans == {}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_dependents_of_a_failed_job_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeJobs(fail=("extract-a",))
    monkeypatch.setattr("grid.local.run_job", fake)
    jobs = [Job("extract-a", "extract", HELP), Job("probe-a", "probe", HELP, after=("extract-a",)), Job("extract-b", "extract", HELP)]
    grid, failed = start(tmp_path, jobs, gpus=["0"])
    assert failed == ["extract-a", "probe-a"] and set(fake.spans) == {"extract-a", "extract-b"}
    assert read_state(grid, "probe-a") | {"time": ""} == {"state": "failed", "last": "dependency extract-a failed", "time": ""}


@pytest.mark.slow  # starts the installed command
def test_a_stage_named_file_in_the_working_folder_is_never_what_a_job_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid started in a folder holding `extract.py` runs medfm's extract, not that file (`python -m extract` would)."""
    import subprocess
    import sys

    from grid.jobs import Job
    from grid.state import read_state, run_job, write_jobs

    folder = tmp_path / "work"
    folder.mkdir()
    planted = folder / "extract.py"
    planted.write_text("import pathlib, sys\npathlib.Path('PLANTED_RAN').write_text('x')\nsys.exit(3)\n")
    monkeypatch.chdir(folder)
    naive = subprocess.run([sys.executable, "-m", "extract", "backbones"], capture_output=True, timeout=120)
    assert naive.returncode == 3 and (folder / "PLANTED_RAN").exists()  # the danger is real: -m looks here first
    (folder / "PLANTED_RAN").unlink()
    grid_dir = tmp_path / "grid"
    write_jobs([Job(name="list-backbones", stage="extract", args=("backbones",))], grid_dir)
    assert run_job(grid_dir, "list-backbones") == 0
    assert not (folder / "PLANTED_RAN").exists() and read_state(grid_dir, "list-backbones")["state"] == "done"
    assert "deit" in (grid_dir / "logs" / "list-backbones.log").read_text()
