"""`make paper` runs the study's grid through the real CLIs: every backbone x dataset x scenario, the study's inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO

RECORDER = """#!/bin/sh
echo "MEDFM_OUTPUT=$MEDFM_OUTPUT $(basename "$0") $*" >> "{log}"
"""


def recorders(tmp_path: Path, status: dict[str, int] | None = None) -> Path:
    """Stand-ins for extract, probe and finetune that record each call the Makefile makes (and exit with `status`)."""
    log = tmp_path / "calls.log"
    for tool in ("extract", "probe", "finetune"):
        script = tmp_path / tool
        script.write_text(RECORDER.format(log=log) + f"exit {(status or {}).get(tool, 0)}\n")
        script.chmod(0o755)
    return log


def paper_calls(tmp_path: Path, *variables: str) -> list[str]:
    log = recorders(tmp_path)
    subprocess.run(["make", "--no-print-directory", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "DATA=/data",
                    "STUDY_BACKBONES=sam dinov2", "STUDY_DATASETS=aptos2019 chexpert", "FINETUNE_ARGS=--device cuda:1", *variables],
                   cwd=REPO, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert all(c.startswith("MEDFM_OUTPUT=outputs/paper ") for c in calls)
    return [c.split(" ", 1)[1] for c in calls]


def test_make_paper_runs_every_cell_as_the_official_code_did_then_reports(tmp_path: Path) -> None:
    """PROTOCOL=study: frozen linear on 100 augmented views, frozen DeiT online, unfrozen end to end; all --protocol study."""
    calls = paper_calls(tmp_path)
    inputs = "--root /data/aptos2019 --norm study --interpolation bilinear"
    assert calls[:5] == [
        f"extract run --backbone sam --dataset aptos2019 {inputs} --protocol study --views 100 --augment study --no-tokens",
        "probe run --head linear --backbone sam --dataset aptos2019 --protocol study --epochs 100",
        f"finetune run --head deit --freeze all --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --device cuda:1",
        f"finetune run --head linear --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --device cuda:1",
        f"finetune run --head deit --backbone sam --dataset aptos2019 {inputs} --protocol study --epochs 100 --resume --device cuda:1",
    ]
    assert any(c.startswith("extract run --backbone dinov2 --dataset chexpert --root /data/chexpert --norm study "
                            "--interpolation bilinear --in-chans 1 --protocol study") for c in calls)
    assert len(calls) == 2 * 2 * 5 + 1 and calls[-1] == "probe report"


def test_make_paper_fast_trains_frozen_cells_on_one_cached_view(tmp_path: Path) -> None:
    calls = paper_calls(tmp_path, "PROTOCOL=fast", "PAPER_EPOCHS=30")
    assert calls[:3] == [
        "extract run --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear",
        "probe run --head linear --backbone sam --dataset aptos2019 --epochs 30",
        "finetune run --head linear --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear "
        "--epochs 30 --resume --device cuda:1",
    ]
    assert not any("--protocol" in c or "--views" in c for c in calls)


def test_make_paper_refuses_an_unknown_protocol(tmp_path: Path) -> None:
    log = recorders(tmp_path)
    result = subprocess.run(["make", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "PROTOCOL=exact"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "PROTOCOL must be study or fast, got 'exact'" in result.stderr and not log.exists()


def test_make_paper_stops_at_the_first_failure(tmp_path: Path) -> None:
    log = recorders(tmp_path, {"extract": 3})
    result = subprocess.run(["make", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "STUDY_BACKBONES=sam dino", "STUDY_DATASETS=ddsm"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert [c.split(" ")[1] for c in log.read_text().splitlines()] == ["extract"]  # nothing ran after the failed extraction
