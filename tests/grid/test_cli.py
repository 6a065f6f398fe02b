"""`grid run` and `grid status` as a user types them: the plan, one-line mistakes, the SLURM seam, a tiny real grid."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import grid as grid_package
from grid.cli import main
from grid.jobs import Job
from grid.plan import GridSpec, write_spec
from grid.state import mark, write_jobs
from ledger.records import RunRecord
from ledger.store import Ledger
from tests.tiny import TINY_VIT, run_main

TINY = ["--protocol", "medfm", "--backbones", "deit", "--datasets", "demo", "--epochs", "2",
        *[a for k, v in TINY_VIT.items() for a in ("--override", f"{k}={v}")]]
SMALL_DATA = "--weights random --image-size 32 --workers 0 --device cpu --opt per_class=8"
DEIT_T = "--head-depth 1 --head-preset deit-t --head-weights random"


def test_dry_run_of_the_studys_grid_prints_128_cells_their_jobs_and_gpu_hours_and_runs_nothing(tmp_path, monkeypatch) -> None:
    code, out, err = run_main(main, ["run", "--dry-run", "--data", "/data", "--grid", str(tmp_path / "g")], monkeypatch)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("grid: 128 cells (8 backbones x 4 datasets x 4 scenarios x 1 seed, protocol study, 100 epochs): "
                               "0 done, 128 to run")
    assert lines[1] == "jobs: 160 (32 extract, 32 probe, 96 finetune)"
    assert lines[2].startswith("estimated GPU-hours: ") and "an estimate" in lines[2]
    assert float(lines[2].split()[2]) > 0 and not (tmp_path / "g").exists()


def test_print_commands_lists_every_job_dependencies_first(tmp_path, monkeypatch) -> None:
    code, out, _ = run_main(main, ["run", "--dry-run", "--print-commands", "--backbones", "deit dino", "--datasets", "ddsm",
                                   "--scenarios", "frozen-linear", "--data", "/d", "--probe-args", "--batch-size 32"], monkeypatch)
    commands = [line for line in out.splitlines() if line.split(" ")[0] in ("extract", "probe", "finetune")]
    assert code == 0 and commands == [  # medfm's installed commands, never `python -m` (which looks in the working folder)
        "extract run --backbone deit --dataset ddsm --root /d/ddsm --norm study --interpolation bilinear --in-chans 1 "
        "--protocol study --views 100 --augment study --no-tokens",
        "probe sweep --head linear --backbone deit --dataset ddsm --protocol study --epochs 100 --seed 0 --batch-size 32",
        "extract run --backbone dino --dataset ddsm --root /d/ddsm --norm study --interpolation bilinear --in-chans 1 "
        "--protocol study --views 100 --augment study --no-tokens",
        "probe sweep --head linear --backbone dino --dataset ddsm --protocol study --epochs 100 --seed 0 --batch-size 32",
    ]


@pytest.mark.parametrize(("args", "message"), [
    (["--backbones", "deit,dinov9"], "error: unknown backbone 'dinov9'; nearest: "),
    (["--scenarios", "frozen-linear,frozen"], "error: unknown scenario 'frozen'; choose one of: frozen-linear, "),
    (["--executor", "pbs"], "error: --executor must be local or slurm, got 'pbs'"),
    (["--seeds", "0,x"], "error: --seeds takes comma-separated whole numbers such as 0,1,2, got '0,x'"),
    (["--resources", "finetune:gpus=two"], "error: --resources finetune:gpus=two: gpus must be a whole number"),
    (["--extract-args", "--opt 'a"], "error: --extract-args is not a valid option string"),
    (["--null", "0"], "error: --null is the number of random-weight draws per backbone, 1 or more"),
])
def test_a_mistake_is_one_line_exit_2_and_nothing_planned(tmp_path, monkeypatch, args, message) -> None:
    code, out, err = run_main(main, ["run", "--grid", str(tmp_path / "g"), *args], monkeypatch)
    assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1 and out == ""
    assert not (tmp_path / "g").exists()


def test_slurm_without_its_executor_module_is_one_line_and_nothing_written(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "grid.slurm", None)  # as if grid/slurm.py (or submitit) were not installed
    monkeypatch.delattr(grid_package, "slurm", raising=False)
    code, _, err = run_main(main, ["run", "--executor", "slurm", "--grid", str(tmp_path / "g"), *TINY], monkeypatch)
    assert code == 2 and err.startswith("error: the slurm executor is not installed here (") and err.endswith("; use --executor local\n")
    assert not (tmp_path / "g").exists()


def test_slurm_gets_the_planned_jobs_written_to_the_grid_folder_and_the_cluster_options(tmp_path, monkeypatch) -> None:
    calls = []

    def submit(jobs: list[Job], grid_dir: Path, options: dict[str, str]) -> dict[str, str]:
        calls.append(([j.name for j in jobs], sorted(p.name for p in (grid_dir / "jobs").iterdir()), options))
        return {job.name: str(100 + i) for i, job in enumerate(jobs)}

    fake = types.SimpleNamespace(submit=submit)
    monkeypatch.setitem(sys.modules, "grid.slurm", fake)
    monkeypatch.setattr(grid_package, "slurm", fake, raising=False)
    code, out, _ = run_main(main, ["run", "--executor", "slurm", "--grid", str(tmp_path / "g"), "--partition", "gpu", "--qos", "low",
                                   "--slurm-opt", "constraint=a100", *TINY], monkeypatch)
    names = ["extract-deit-demo", "probe-deit-demo", "finetune-unfrozen-linear-deit-demo-s0", "finetune-unfrozen-deit-deit-demo-s0"]
    assert code == 0 and "submitted 4 SLURM jobs" in out
    assert calls == [(names, sorted(f"{n}.json" for n in names), {"partition": "gpu", "qos": "low", "constraint": "a100"})]


def test_status_shows_each_cell_done_running_failed_or_pending_and_the_counts(tmp_path, monkeypatch) -> None:
    grid, out_dir = tmp_path / "g", tmp_path / "out"
    spec = GridSpec(backbones=("deit",), datasets=("demo",), protocol="medfm", epochs=2, output=str(out_dir))
    write_spec(spec, grid)
    write_jobs([Job("probe-deit-demo", "probe", ("sweep",), cells=("frozen-linear/deit/demo/seed0", "frozen-deit/deit/demo/seed0")),
                Job("finetune-unfrozen-linear-deit-demo-s0", "finetune", ("run",), cells=("unfrozen-linear/deit/demo/seed0",)),
                Job("finetune-unfrozen-deit-deit-demo-s0", "finetune", ("run",), after=("probe-deit-demo",),
                    cells=("unfrozen-deit/deit/demo/seed0",))], grid)
    Ledger(out_dir / "runs" / "results.sqlite").add(RunRecord(
        stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear", config={"epochs": 2}, config_key="k",
        cache_fingerprint="f", seed=0, primary_metric="accuracy", val_score=1.0, test_metrics={}, test_primary=1.0, backbone_random=True))
    mark(grid, "probe-deit-demo", "running", pid=1, host="node3", slurm_job="77_1")
    mark(grid, "finetune-unfrozen-linear-deit-demo-s0", "failed", rc=1, last="RuntimeError: CUDA out of memory [x]")
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_main(main, ["status", "--grid", str(grid)], monkeypatch)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]] for line in out.splitlines() if "/seed0" in line}
    assert code == 0 and rows == {
        "frozen-linear/deit/demo/seed0": ["done", "probe-deit-demo", ""],
        "frozen-deit/deit/demo/seed0": ["running", "probe-deit-demo", "on node3, SLURM job 77_1"],
        "unfrozen-linear/deit/demo/seed0": ["failed", "finetune-unfrozen-linear-deit-demo-s0", "RuntimeError: CUDA out of memory [x]"],
        "unfrozen-deit/deit/demo/seed0": ["pending", "finetune-unfrozen-deit-deit-demo-s0", "waits for probe-deit-demo"],
    }
    assert out.splitlines()[-1] == "4 cells: 1 done, 1 running, 1 failed, 1 pending"


def test_status_of_a_folder_without_a_grid_is_one_line(tmp_path, monkeypatch) -> None:
    code, _, err = run_main(main, ["status", "--grid", str(tmp_path)], monkeypatch)
    assert code == 2 and err.startswith(f"error: no grid in {tmp_path} (no grid.json); start one with `grid run`")


@pytest.mark.slow
def test_a_tiny_grid_runs_here_end_to_end_into_the_ledger_and_a_rerun_runs_nothing(tmp_path, monkeypatch, isolated_outputs) -> None:
    args = ["run", *TINY, "--max-jobs", "2", "--extract-args", f"{SMALL_DATA} --batch-size 16", "--probe-args", f"--device cpu {DEIT_T}",
            "--finetune-args", f"{SMALL_DATA} --batch-size 4 {DEIT_T}"]
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, out + err
    rows = Ledger(isolated_outputs / "runs" / "results.sqlite").rows()
    assert sorted((r.stage, r.scenario, r.backbone, r.dataset, r.seed) for r in rows) == [
        ("finetune", "unfrozen-deit", "deit", "demo", 0), ("finetune", "unfrozen-linear", "deit", "demo", 0),
        ("probe", "frozen-deit", "deit", "demo", 0), ("probe", "frozen-linear", "deit", "demo", 0)]
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_main(main, ["status"], monkeypatch)
    assert code == 0 and out.splitlines()[-1] == "4 cells: 4 done, 0 running, 0 failed, 0 pending"
    code, out, _ = run_main(main, args, monkeypatch)
    assert code == 0 and "nothing to run: all 4 cells are done" in out and len(Ledger(isolated_outputs / "runs" / "results.sqlite").rows()) == 4


@pytest.mark.parametrize("damage", ["{}", '{"state": "do', "dir", "[1, 2]"])
def test_a_damaged_state_file_or_grid_json_is_one_line(tmp_path, monkeypatch, damage: str) -> None:
    """A job's state file emptied, truncated, made a folder or a list, and grid.json so: one line naming the file and
    what to do, exit 2 (`grid status`), never a traceback."""
    from grid.plan import GridSpec, plan, write_spec
    from grid.state import mark, state_path, write_jobs

    grid_dir = tmp_path / "g"
    spec = GridSpec(backbones=("deit",), datasets=("demo",), protocol="medfm", epochs=2, output=str(tmp_path / "out"))
    write_spec(spec, grid_dir)
    jobs = plan(spec, grid_dir).jobs
    write_jobs(jobs, grid_dir)
    mark(grid_dir, jobs[0].name, "done", rc=0)
    for target in (state_path(grid_dir, jobs[0].name), grid_dir / "grid.json"):
        target.unlink()
        if damage == "dir":
            target.mkdir()
        else:
            target.write_text(damage)
        code, out, err = run_main(main, ["status", "--grid", str(grid_dir)], monkeypatch)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert code == 2 and last.startswith(f"error: {target} (") and ("remove it" in last), (target, out, err)
        target.rmdir() if target.is_dir() else target.unlink()
        if target.name == "grid.json":
            write_spec(spec, grid_dir)
        else:
            mark(grid_dir, jobs[0].name, "done", rc=0)
