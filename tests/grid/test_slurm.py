"""`grid run --executor slurm` on a real single-node SLURM (tests/grid/conftest.py): the same ledger as a local run,
dependencies that hold (and a check that catches a dropped one), a killed and requeued finetune that resumes exactly,
and bad input that submits nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from finetune.train import RESULT
from grid.cli import main
from grid.jobs import Job, Resources
from grid.slurm import SLURM_FOLDER, SUBMITTED, batches, sbatch_parameters, submit
from grid.state import log_path, read_job, read_state, run_job, write_jobs
from probe.results import Ledger
from tests.tiny import run_main

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
    return ["run", "--backbones", "deit", "--datasets", "demo", "--scenarios", "frozen-linear,unfrozen-linear", "--protocol", "fast",
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
    histories = [[{k: v for k, v in epoch.items() if k != "seconds"} for epoch in json.loads(path.read_text())["history"]]
                 for run in ("requeued", "whole") for path in (tmp_path / run / "runs" / "finetune").glob(f"*/{RESULT}")]
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
