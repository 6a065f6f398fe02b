"""`make paper` runs the study's grid through `grid run`: every backbone x dataset x scenario, the study's inputs, then the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.stand_ins import RECORDER

# `grid` as the Makefile calls it, recorded, then planned for real without running anything: the jobs' commands printed.
PLANNER = RECORDER + 'exec "{python}" -m grid "$@" --dry-run --print-commands\n'


def stand_ins(tmp_path: Path, grid_status: int | None = None) -> Path:
    """`probe` records its call; `grid` records its call and prints the commands of the grid it was asked for (or fails)."""
    log = tmp_path / "calls.log"
    (tmp_path / "probe").write_text(RECORDER.format(log=log))
    (tmp_path / "grid").write_text(RECORDER.format(log=log) + f"exit {grid_status}\n" if grid_status is not None
                                   else PLANNER.format(log=log, python=sys.executable))
    for tool in ("probe", "grid"):
        (tmp_path / tool).chmod(0o755)
    return log


def make_paper(tmp_path: Path, *variables: str, grid_status: int | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = stand_ins(tmp_path, grid_status)
    result = subprocess.run(["make", "--no-print-directory", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "DATA=/data",
                             f"PAPER_OUTPUT={tmp_path / 'paper'}", "STUDY_BACKBONES=sam dinov2", "STUDY_DATASETS=aptos2019 chexpert",
                             "FINETUNE_ARGS=--workers 8", *variables], cwd=REPO, capture_output=True, text=True)
    calls = log.read_text().splitlines() if log.exists() else []
    assert all(c.startswith(f"MEDFM_OUTPUT={tmp_path / 'paper'} ") for c in calls)
    return result, [c.split(" ", 1)[1] for c in calls]


def stage_commands(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.split(" ")[0] in ("extract", "probe", "finetune")]


@pytest.mark.slow  # `grid` plans for real: a Python process
def test_make_paper_runs_every_cell_as_the_official_code_did_then_reports(tmp_path: Path) -> None:
    """PROTOCOL=study: frozen linear on 100 augmented views, frozen DeiT online, unfrozen end to end; all --protocol study."""
    result, calls = make_paper(tmp_path)
    assert result.returncode == 0, result.stderr
    commands = stage_commands(result)
    inputs = "--root /data/aptos2019 --norm study --interpolation bilinear"
    assert commands[:5] == [
        f"extract run --backbone sam --dataset aptos2019 {inputs} --protocol study --views 100 --augment study --no-tokens",
        "probe sweep --head linear --backbone sam --dataset aptos2019 --protocol study --epochs 100 --seed 0",
        f"finetune run --head deit --freeze all --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --seed 0 --workers 8",
        f"finetune run --head linear --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --seed 0 --workers 8",
        f"finetune run --head deit --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --seed 0 --workers 8",
    ]
    assert any(c.startswith("extract run --backbone dinov2 --dataset chexpert --root /data/chexpert --norm study "
                            "--interpolation bilinear --in-chans 1 --protocol study") for c in commands)
    assert len(commands) == 2 * 2 * 5 and "grid: 16 cells" in result.stdout
    assert calls[0].startswith("grid run --executor local --protocol study --backbones sam dinov2 --datasets aptos2019 chexpert")
    assert calls[1:] == ["probe report"]


@pytest.mark.slow  # `grid` plans for real: a Python process
def test_make_paper_medfm_trains_frozen_cells_on_one_cached_view(tmp_path: Path) -> None:
    result, _ = make_paper(tmp_path, "PROTOCOL=medfm", "PAPER_EPOCHS=30")
    commands = stage_commands(result)
    assert commands[:3] == [
        "extract run --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear",
        "probe sweep --head linear,deit --backbone sam --dataset aptos2019 --epochs 30 --seed 0",
        "finetune run --head linear --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear "
        "--epochs 30 --resume --seed 0 --workers 8",
    ]
    assert not any("--protocol" in c or "--views" in c for c in commands)


@pytest.mark.slow  # `grid` plans for real: a Python process
def test_make_paper_refuses_an_unknown_protocol_in_one_line(tmp_path: Path) -> None:
    result, calls = make_paper(tmp_path, "PROTOCOL=exact")
    assert result.returncode != 0 and "error: --protocol must be medfm or study" in result.stderr
    assert [c.split(" ")[0] for c in calls] == ["grid"] and stage_commands(result) == []  # no report, no job


def test_make_paper_stops_when_the_grid_fails_and_reports_nothing(tmp_path: Path) -> None:
    result, calls = make_paper(tmp_path, grid_status=1)
    assert result.returncode != 0 and [c.split(" ")[0] for c in calls] == ["grid"]


def test_make_paper_on_slurm_submits_and_says_how_to_report_later(tmp_path: Path) -> None:
    result, calls = make_paper(tmp_path, "EXECUTOR=slurm", "GRID_ARGS=--partition gpu", grid_status=0)
    assert result.returncode == 0 and calls == [calls[0]] and "--executor slurm" in calls[0] and calls[0].endswith("--partition gpu")
    assert "when every cell is done" in result.stdout and "probe report" in result.stdout
