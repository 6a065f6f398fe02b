"""`make paper` runs the study's grid through the real CLIs: every backbone x dataset x scenario, the study's inputs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO

RECORDER = """#!/bin/sh
echo "MEDFM_OUTPUT=$MEDFM_OUTPUT $(basename "$0") $*" >> "{log}"
"""


def test_make_paper_walks_the_studys_grid_with_its_inputs_then_reports(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    for tool in ("extract", "probe", "finetune"):  # stand-ins that record each call the Makefile makes
        script = tmp_path / tool
        script.write_text(RECORDER.format(log=log))
        script.chmod(0o755)
    subprocess.run(["make", "--no-print-directory", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "DATA=/data",
                    "STUDY_BACKBONES=sam dinov2", "STUDY_DATASETS=aptos2019 chexpert", "FINETUNE_ARGS=--device cuda:1"], cwd=REPO, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    assert all(c.startswith("MEDFM_OUTPUT=outputs/paper ") for c in calls)
    calls = [c.split(" ", 1)[1] for c in calls]
    assert calls[:5] == [
        "extract run --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear",
        "probe run --head linear --backbone sam --dataset aptos2019",
        "finetune run --head linear --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear --resume --device cuda:1",
        "probe run --head deit --backbone sam --dataset aptos2019",
        "finetune run --head deit --backbone sam --dataset aptos2019 --root /data/aptos2019 --norm study --interpolation bilinear --resume --device cuda:1",
    ]
    assert "extract run --backbone dinov2 --dataset chexpert --root /data/chexpert --norm study --interpolation bilinear --in-chans 1" in calls
    assert len(calls) == 2 * 2 * 5 + 1 and calls[-1] == "probe report"


def test_make_paper_stops_at_the_first_failure(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    for tool, status in (("extract", 3), ("probe", 0), ("finetune", 0)):
        script = tmp_path / tool
        script.write_text(RECORDER.format(log=log) + f"exit {status}\n")
        script.chmod(0o755)
    result = subprocess.run(["make", "paper", f"BIN={tmp_path}", "PY=/bin/sh", "STUDY_BACKBONES=sam dino", "STUDY_DATASETS=ddsm"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert [c.split(" ")[1] for c in log.read_text().splitlines()] == ["extract"]  # nothing ran after the failed extraction
