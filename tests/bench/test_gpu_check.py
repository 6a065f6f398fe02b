"""`make gpu-check`: refuses without CUDA in one line; `--smoke` runs every step on the CPU and prints its figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check
from bench.common import REPO
from common.errors import MedfmError

STEPS = ("extract ViT-B", "extract ResNet152", "torchrun extract", "probe sweep deit", "finetune")


def test_without_cuda_the_check_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(MedfmError, match="no CUDA device here.*--smoke"):
        gpu_check.main([])


@pytest.mark.slow
def test_smoke_runs_every_step_on_the_cpu_and_prints_its_figure(tmp_path: Path) -> None:
    env = {**os.environ, "MEDFM_OUTPUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for step in STEPS:
        assert any(line.startswith(f"{step}: ") and " = " in line for line in lines), (step, done.stdout[-3000:])
    assert "fp32 (the CPU" in done.stdout and "RANDOM weights" in done.stdout
    assert "1 per pass (auto)" in done.stdout  # --deit-per-pass auto on the CPU
    (saved,) = (tmp_path / "bench").glob("gpu_check-*.json")
    figures = json.loads(saved.read_text())["figures"]
    assert {f["step"] for f in figures} == set(STEPS) and all(f["value"] > 0 for f in figures)
    assert any(f["name"] == "killed after a checkpoint" and "checkpoint at epoch" in f["note"] for f in figures)
