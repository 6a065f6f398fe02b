"""`grid run --executor slurm` on a real single-node SLURM (tests/grid/conftest.py): the same ledger as a local run,
dependencies that hold (and a check that catches a dropped one), a killed and requeued finetune that resumes exactly,
bad input that submits nothing, and `grid status` telling what SLURM did to jobs that never ran."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from grid.cli import main
from grid.jobs import Job, Resources
from grid.plan import GridSpec, write_spec
from grid.slurm import SLURM_FOLDER, SUBMITTED, batches, sbatch_parameters, submit
from grid.state import log_path, mark, read_job, read_state, run_job, state_path, write_jobs
from ledger.runs import read_history
from ledger.store import Ledger
from tests.tiny import run_main

# one test at a time on the one test cluster (its 2 CPUs), whichever pytest-xdist worker runs them (`make test`: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("slurm")

SMALL = Resources(gpus=0, cpus=1, mem_gb=1, minutes=10)
TINY_DEIT = ("--override", "embed_dim=32", "--override", "depth=1", "--override", "num_heads=2")
DEMO = ("--dataset", "demo", "--opt", "per_class=8")
EXTRACT = ("run", "--backbone", "deit", *DEMO, "--weights", "random", "--image-size", "32", "--batch-size", "16", "--workers", "0",
           "--device", "cpu", *TINY_DEIT)
FINETUNE = ("run", "--backbone", "deit", *DEMO, "--head", "linear", "--weights", "random", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--resume", *TINY_DEIT)
WAIT_S = 300


def tiny_grid(grid_dir: Path, executor: str, *more: str) -> list[str]:
    """`grid run` of one tiny DeiT on demo data: an extraction, its probe sweep after it, an unfrozen finetune; CPU."""
    resources = [f"--resources={kind}:{key}={value}" for kind in ("extract", "probe", "finetune")
                 for key, value in (("gpus", 0), ("cpus", 1), ("mem_gb", 1), ("minutes", 10))]
    return ["run", "--backbones", "deit", "--datasets", "demo", "--scenarios", "frozen-linear,unfrozen-linear", "--protocol", "medfm",
            "--epochs", "3", *TINY_DEIT, "--extract-args", "--weights random --image-size 32 --batch-size 16 --workers 0 --device cpu "
            "--opt per_class=8", "--probe-args", "--device cpu", "--finetune-args", "--weights random --image-size 32 --batch-size 4 "
            "--workers 0 --device cpu --opt per_class=8", *resources, "--executor", executor, "--grid", str(grid_dir), *more]


def queue() -> set[str]:
    """This user's SLURM jobs (array tasks one by one)."""
    return set(subprocess.run(["squeue", "--me", "--array", "--noheader", "--format=%i"], capture_output=True, text=True,
                              check=True).stdout.split())


def wait_for(ids: list[str], grid_dir: Path) -> None:
    """Until none of `ids` is queued or running; too long fails, naming what each job logged last."""
    deadline = time.monotonic() + WAIT_S
    while queue() & set(ids):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids])
            logs = {p.name: p.read_text()[-500:] for p in (grid_dir / "logs").glob("*.log")}
            pytest.fail(f"SLURM jobs {ids} still queued after {WAIT_S} s; logs: {logs}")
        time.sleep(0.5)


def submitted_ids(grid_dir: Path) -> dict[str, str]:
    return json.loads((grid_dir / SLURM_FOLDER / SUBMITTED).read_text())


def out_of_order(grid_dir: Path, jobs: list[Job]) -> list[str]:
    """`job before dep` for every job that started before a job it waits for had ended successfully."""
    wrong = []
    for job in jobs:
        started = read_state(grid_dir, job.name).get("started")
        for dep in job.after:
            before = read_state(grid_dir, dep)
            if started is None or before["state"] != "done" or before["ended"] > started:
                wrong.append(f"{job.name} before {dep}")
    return wrong


def status_rows(grid_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, list[str]], str]:
    """`grid status`'s rows, {cell: [state, job, detail]}, and what it said on stderr."""
    monkeypatch.setenv("COLUMNS", "300")
    code, out, err = run_main(main, ["status", "--grid", str(grid_dir)], monkeypatch)
    assert code == 0, err
    return {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]] for line in out.splitlines() if "/seed" in line}, err


def results(output: Path) -> dict[tuple, tuple]:
    """The ledger's rows by cell: (test metrics, validation score)."""
    rows = Ledger(output / "runs" / "results.sqlite").rows()
    return {(r.stage, r.scenario, r.backbone, r.dataset, r.head, r.seed): (r.test_metrics, r.val_score) for r in rows}


def test_probe_jobs_with_the_same_dependencies_and_resources_batch_into_one_array() -> None:
    extract_a, extract_b = Job("extract-a", "extract", ()), Job("extract-b", "extract", ())
    probe_a1, probe_a2 = (Job(f"probe-a{i}", "probe", (), after=("extract-a",)) for i in (1, 2))
    probe_b = Job("probe-b", "probe", (), after=("extract-b",))
    big = Job("probe-big", "probe", (), after=("extract-a",), resources=Resources(gpus=2))
    finetunes = [Job(f"finetune-{i}", "finetune", ()) for i in (1, 2)]
    grouped = batches([extract_a, probe_a1, extract_b, probe_b, probe_a2, big, *finetunes])
    assert [[j.name for j in group] for group in grouped] == [
        ["extract-a"], ["probe-a1", "probe-a2"], ["extract-b"], ["probe-b"], ["probe-big"], ["finetune-1"], ["finetune-2"]]


def test_sbatch_parameters_carry_the_jobs_resources_the_grids_options_and_the_dependencies() -> None:
    job = Job("finetune-x", "finetune", ("run",), resources=Resources(gpus=4, cpus=16, mem_gb=64, minutes=2880))
    params = sbatch_parameters([job], ["12", "13_0"], {"partition": "gpu", "qos": "high", "constraint": "a100"})
    assert params["job_name"] == "finetune-x" and params["partition"] == "gpu" and params["qos"] == "high" and "account" not in params
    assert (params["gpus_per_node"], params["cpus_per_task"], params["mem"], params["time"]) == (4, 16, "64GB", 2880)
    assert params["ntasks_per_node"] == 1 and params["dependency"] == "afterok:12:13_0"
    assert params["additional_parameters"] == {"begin": "now+60", "kill_on_invalid_dep": "yes", "constraint": "a100"}
    probes = [Job(f"probe-deit-{d}", "probe", ()) for d in ("demo", "ddsm")]
    params = sbatch_parameters(probes, [], {})
    assert params["job_name"] == "probe-deit" and params["dependency"] is None and params["gpus_per_node"] is None


def test_no_sbatch_on_path_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    code, _, err = run_main(main, tiny_grid(tmp_path / "grid", "slurm"), monkeypatch)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: sbatch is not on PATH"), err
    assert "--executor local" in err and not (tmp_path / "grid" / SLURM_FOLDER).exists()


def queued_grid(grid_dir: Path, output: Path) -> dict[str, str]:
    """A grid of seeds 0 and 1 whose state files say six jobs were queued or running on SLURM: {job name: SLURM id}."""
    write_spec(GridSpec(backbones=("deit",), datasets=("demo",), seeds=(0, 1), protocol="medfm", epochs=2, output=str(output)), grid_dir)
    ids = {"extract-deit-demo": "11", "probe-deit-demo": "12_1", "finetune-unfrozen-linear-deit-demo-s0": "13",
           "finetune-unfrozen-deit-deit-demo-s0": "14", "finetune-unfrozen-linear-deit-demo-s1": "15",
           "finetune-unfrozen-deit-deit-demo-s1": "16"}
    cells = {name: (f"{name.split('-')[1]}-{name.split('-')[2]}/deit/demo/seed{name[-1]}",) for name in ids if name.startswith("finetune")}
    write_jobs([Job("extract-deit-demo", "extract", ()),
                Job("probe-deit-demo", "probe", (), after=("extract-deit-demo",),
                    cells=("frozen-linear/deit/demo/seed0", "frozen-deit/deit/demo/seed0")),
                *(Job(name, "finetune", (), cells=cells[name]) for name in cells)], grid_dir)
    for name, slurm_id in ids.items():
        running = name in ("extract-deit-demo", "finetune-unfrozen-deit-deit-demo-s1")
        mark(grid_dir, name, "running", host="node1", slurm_job=slurm_id) if running else mark(grid_dir, name, "pending", slurm_job=slurm_id)
    return ids


SACCT = "11|RUNNING|None\n12_[0-1%4]|PENDING|Dependency\n13|RUNNING|None\n15|CANCELLED by 0|None\n16|TIMEOUT|TimeLimit\n"
SQUEUE = "11|RUNNING|None\n12_1|PENDING|Dependency\n13|RUNNING|None\n15|CANCELLED|None\n16|TIMEOUT|TimeLimit\n"


@pytest.mark.parametrize("accounting", [True, False])
def test_status_shows_what_slurm_did_to_queued_jobs_from_sacct_or_else_squeue_and_writes_nothing(
        accounting: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid_dir, bin_dir = tmp_path / "grid", tmp_path / "bin"
    ids = queued_grid(grid_dir, tmp_path / "out")
    bin_dir.mkdir()  # sacct and squeue as a cluster with (or without) accounting storage answers them, logging their calls
    sacct = f"printf %s '{SACCT}'" if accounting else "echo 'Slurm accounting storage is disabled' >&2; exit 1"
    for tool, answer in (("sacct", sacct), ("squeue", f"printf %s '{SQUEUE}'")):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n{answer}\n')
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    states = {p.name: p.read_text() for p in (grid_dir / "state").iterdir()}
    rows, err = status_rows(grid_dir, monkeypatch)
    assert rows == {
        "frozen-linear/deit/demo/seed0": ["pending", "probe-deit-demo", "queued as SLURM job 12_1 (Dependency), waits for extract-deit-demo"],
        "frozen-deit/deit/demo/seed0": ["pending", "probe-deit-demo", "queued as SLURM job 12_1 (Dependency), waits for extract-deit-demo"],
        "unfrozen-linear/deit/demo/seed0": ["running", "finetune-unfrozen-linear-deit-demo-s0", "SLURM job 13"],
        "unfrozen-deit/deit/demo/seed0": ["failed", "finetune-unfrozen-deit-deit-demo-s0", "SLURM no longer knows job 14"],
        "frozen-linear/deit/demo/seed1": ["pending", "", "not planned yet: `grid run` plans it"],
        "frozen-deit/deit/demo/seed1": ["pending", "", "not planned yet: `grid run` plans it"],
        "unfrozen-linear/deit/demo/seed1": ["failed", "finetune-unfrozen-linear-deit-demo-s1", "SLURM: CANCELLED"],
        "unfrozen-deit/deit/demo/seed1": ["failed", "finetune-unfrozen-deit-deit-demo-s1", "SLURM: TIMEOUT TimeLimit"],
    } and err == ""
    asked = ",".join(sorted(ids.values()))
    assert (tmp_path / "calls").read_text().splitlines() == [f"sacct -n -P -X -j {asked} -o JobID,State,Reason"] + (
        [] if accounting else [f"squeue -h -r -t all -j {asked} -o %i|%T|%r"])
    assert {p.name: p.read_text() for p in (grid_dir / "state").iterdir()} == states


def test_status_without_slurm_commands_shows_the_state_files_and_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid_dir = tmp_path / "grid"
    queued_grid(grid_dir, tmp_path / "out")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    rows, err = status_rows(grid_dir, monkeypatch)
    assert rows["frozen-linear/deit/demo/seed0"] == ["pending", "probe-deit-demo", "queued as SLURM job 12_1, waits for extract-deit-demo"]
    assert rows["unfrozen-deit/deit/demo/seed0"] == ["pending", "finetune-unfrozen-deit-deit-demo-s0", "queued as SLURM job 14"]
    assert rows["unfrozen-deit/deit/demo/seed1"] == ["running", "finetune-unfrozen-deit-deit-demo-s1", "on node1, SLURM job 16"]
    assert err == ("warning: SLURM did not say what became of 6 queued or running jobs: SLURM does not answer (sacct is not on PATH; "
                   "squeue is not on PATH); their rows show the grid folder's state files only\n")


@pytest.mark.slow  # a real SLURM runs the jobs
def test_a_grid_on_slurm_fills_the_ledger_as_the_same_grid_run_locally(slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_slurm, here = tmp_path / "slurm", tmp_path / "local"
    monkeypatch.setenv("MEDFM_OUTPUT", str(on_slurm / "out"))  # sbatch hands this environment to the jobs
    code, out, err = run_main(main, tiny_grid(on_slurm / "grid", "slurm"), monkeypatch)
    assert code == 0, err
    ids = submitted_ids(on_slurm / "grid")
    assert sorted(ids) == ["extract-deit-demo", "finetune-unfrozen-linear-deit-demo-s0", "probe-deit-demo"] and "submitted 3" in out
    assert {read_state(on_slurm / "grid", name).get("slurm_job") for name in ids} <= set(ids.values()) | {""}
    monkeypatch.setenv("MEDFM_OUTPUT", str(here / "out"))
    code, _, err = run_main(main, tiny_grid(here / "grid", "local"), monkeypatch)  # runs while SLURM runs its copy
    assert code == 0, err
    wait_for(list(ids.values()), on_slurm / "grid")

    jobs = [read_job(on_slurm / "grid", name) for name in ids]
    assert {name: read_state(on_slurm / "grid", name)["state"] for name in ids} == dict.fromkeys(ids, "done")
    assert {name: read_state(on_slurm / "grid", name)["slurm_job"] for name in ids} == ids  # each ran as the job submitted for it
    assert out_of_order(on_slurm / "grid", jobs) == []
    slurm_results, local_results = results(on_slurm / "out"), results(here / "out")
    assert sorted(key[:2] for key in slurm_results) == [("finetune", "unfrozen-linear"), ("probe", "frozen-linear")]
    assert slurm_results == local_results
    assert all((on_slurm / "grid" / "slurm" / f"{slurm_id}_0_log.out").exists() for slurm_id in ids.values())

    monkeypatch.setenv("MEDFM_OUTPUT", str(on_slurm / "out"))
    code, out, err = run_main(main, tiny_grid(on_slurm / "grid", "slurm"), monkeypatch)  # the rerun: nothing is missing
    assert code == 0 and "nothing to run" in out and submitted_ids(on_slurm / "grid") == ids, err


@pytest.mark.slow  # a real SLURM runs the jobs
def test_probe_jobs_start_after_their_extraction_and_without_the_dependency_they_would_not(
        slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extraction = Job("extract-deit-demo", "extract", EXTRACT, resources=SMALL)
    probes = [Job(f"probe-deit-demo-s{seed}", "probe", ("run", "--head", "linear", "--backbone", "deit", "--dataset", "demo",
                                                        "--epochs", "2", "--seed", str(seed), "--device", "cpu"),
                  after=(extraction.name,), resources=SMALL) for seed in (0, 1)]
    jobs = [extraction, *probes]
    grid_dir = tmp_path / "grid"
    write_jobs(jobs, grid_dir)
    ids = submit(jobs, grid_dir, {"partition": "debug"})
    (array,) = {ids[p.name].split("_")[0] for p in probes}
    assert [ids[p.name] for p in probes] == [f"{array}_0", f"{array}_1"]  # one job array
    wait_for(list(ids.values()), grid_dir)
    assert [read_state(grid_dir, job.name)["state"] for job in jobs] == ["done"] * 3
    assert out_of_order(grid_dir, jobs) == []

    # a probe job with its dependency dropped: it starts beside the extraction, finds no cache, and the check names it
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path / "dropped"))
    dropped = [extraction, *(Job(p.name, p.stage, p.args, resources=p.resources) for p in probes[:1])]
    write_jobs(dropped, tmp_path / "dropped-grid")
    ids = submit(dropped, tmp_path / "dropped-grid", {})
    deadline = time.monotonic() + WAIT_S
    while read_state(tmp_path / "dropped-grid", probes[0].name)["state"] in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", *ids.values()], check=True)  # the extraction need not finish: its probe already ran without it
    wait_for(list(ids.values()), tmp_path / "dropped-grid")
    assert read_state(tmp_path / "dropped-grid", probes[0].name)["state"] == "failed"
    assert out_of_order(tmp_path / "dropped-grid", probes[:1]) == [f"{probes[0].name} before {extraction.name}"]


@pytest.mark.slow  # a real SLURM runs the extraction and cancels its sweep
def test_status_shows_a_sweep_slurm_cancelled_after_its_extraction_failed_as_failed_with_slurms_reason(
        slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid_dir, cell = tmp_path / "grid", "frozen-linear/deit/demo/seed0"
    write_spec(GridSpec(backbones=("deit",), datasets=("demo",), scenarios=("frozen-linear",), protocol="medfm", epochs=2,
                        output=str(tmp_path / "out")), grid_dir)
    extraction = Job("extract-deit-demo", "extract", ("no-such-command",), resources=SMALL)  # fails at once
    sweep = Job("probe-deit-demo", "probe", ("sweep",), after=(extraction.name,), resources=SMALL, cells=(cell,))
    write_jobs([extraction, sweep], grid_dir)
    ids = submit([extraction, sweep], grid_dir, {})
    wait_for(list(ids.values()), grid_dir)
    assert read_state(grid_dir, extraction.name)["state"] == "failed"
    assert read_state(grid_dir, sweep.name) == {**read_state(grid_dir, sweep.name), "state": "pending", "slurm_job": ids[sweep.name]}
    before = state_path(grid_dir, sweep.name).read_text()  # the sweep never ran: its state file still says queued
    rows, err = status_rows(grid_dir, monkeypatch)
    assert rows == {cell: ["failed", sweep.name, "SLURM: CANCELLED DependencyNeverSatisfied"]} and err == ""
    assert state_path(grid_dir, sweep.name).read_text() == before  # `grid status` only reads


@pytest.mark.slow  # a real SLURM runs the job, and requeues it
def test_a_finetune_killed_by_a_requeue_resumes_and_ends_as_an_uninterrupted_run(slurm, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    job = Job("finetune-unfrozen-linear-deit-demo-s0", "finetune", (*FINETUNE, "--epochs", "8"), resources=SMALL, cells=("x",))
    grid_dir, whole_dir = tmp_path / "grid", tmp_path / "whole-grid"
    for folder in (grid_dir, whole_dir):
        write_jobs([job], folder)
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path / "requeued"))
    slurm_id = submit([job], grid_dir, {})[job.name]
    whole = threading.Thread(target=run_job, args=(whole_dir, job.name, {"MEDFM_OUTPUT": str(tmp_path / "whole")}))
    whole.start()  # the uninterrupted run, here, meanwhile

    deadline = time.monotonic() + WAIT_S
    while not list((tmp_path / "requeued" / "runs" / "finetune").glob("*/checkpoint.pt")):
        assert time.monotonic() < deadline and read_state(grid_dir, job.name)["state"] in ("pending", "running"), log_path(grid_dir, job.name).read_text()
        time.sleep(0.05)
    subprocess.run(["scontrol", "requeue", slurm_id], check=True)  # as a preemption: SIGTERM, then back in the queue
    while True:  # SLURM holds a requeued job back two minutes; the test lets it start as soon as it is pending again
        state = subprocess.run(["squeue", "--noheader", "--format=%t", "--jobs", slurm_id], capture_output=True, text=True).stdout.strip()
        if state == "PD":
            subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now"], check=True)
            break
        assert time.monotonic() < deadline, f"job {slurm_id} did not return to the queue (state {state!r})"
        time.sleep(0.2)
    wait_for([slurm_id], grid_dir)
    whole.join()

    log = log_path(grid_dir, job.name).read_text()
    assert read_state(grid_dir, job.name)["state"] == "done", log
    assert log.count("\n== ") + log.startswith("== ") == 2 and "resuming" in log  # started twice, the second time from its checkpoint
    (requeued,), (uninterrupted,) = results(tmp_path / "requeued").values(), results(tmp_path / "whole").values()
    assert requeued == uninterrupted
    histories = [[{k: v for k, v in epoch.items() if k != "seconds"} for epoch in read_history(folder)]
                 for run in ("requeued", "whole") for folder in (tmp_path / run / "runs" / "finetune").glob("*/")]
    assert len(histories) == 2 and len(histories[0]) == 8 and histories[0] == histories[1]  # every epoch, those after the kill too


@pytest.mark.slow  # asks a real SLURM
@pytest.mark.parametrize(("more", "said"), [
    (["--partition", "nope"], "SLURM partition 'nope' does not exist; partitions here: debug"),
    (["--resources", "finetune:mem_gb=100000000"], "sbatch refused grid job finetune-unfrozen-linear-deit-demo-s0: Memory specification"),
])
def test_a_partition_or_request_slurm_refuses_is_one_line_and_exit_2_with_nothing_queued(
        slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, more: list[str], said: str) -> None:
    queued_before = queue()
    code, _, err = run_main(main, tiny_grid(tmp_path / "grid", "slurm", *more), monkeypatch)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {said}"), err
    assert queue() == queued_before and not (tmp_path / "grid" / SLURM_FOLDER / SUBMITTED).exists()


@pytest.mark.slow  # the SLURM client retries for about 10 s before it gives up
def test_a_controller_that_does_not_answer_is_one_line_and_exit_2(slurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "slurm.conf"  # a cluster whose controller nobody runs
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort=1\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    code, _, err = run_main(main, tiny_grid(tmp_path / "grid", "slurm"), monkeypatch)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the SLURM controller does not answer (sinfo: ") and "SLURM_CONF" in err, err
