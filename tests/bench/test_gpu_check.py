"""`make gpu-check`: refuses without CUDA in one line; `--smoke` runs every step on the CPU and prints its figure, and
the precision x compile table; a compilation that fails stops the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends import registry
from torch._dynamo.utils import counters

from bench import gpu_check
from bench.common import REPO
from common.errors import MedfmError

BACKBONES = ("ViT-B", "ResNet152", "SAM ViT-B")
STEPS = ("extract ViT-B", "extract ResNet152", *(f"forward {b}" for b in BACKBONES), "torchrun extract", "probe sweep deit", "finetune", "device views")
LEVELS = "largest difference from Pillow's views"
CELLS = {("fp32", None), ("bf16", None), ("bf16", "eager")}  # the smoke run's precision x compile cells of each backbone


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
    assert {f["step"] for f in figures} == set(STEPS) and all(f["value"] > 0 for f in figures if f["name"] != LEVELS)
    assert [f["value"] for f in figures if f["name"] == LEVELS] == [0]  # the device's views are Pillow's, bit for bit
    assert any(f["name"] == "killed after a checkpoint" and "checkpoint at epoch" in f["note"] for f in figures)
    saved_json = json.loads(saved.read_text())
    assert len(saved_json["steps"]) == 6 and all(s >= 0 for s in saved_json["steps"].values())
    cells = saved_json["precision_compile"]
    for backbone in BACKBONES:
        mine = [c for c in cells if c["backbone"] == backbone]
        assert {(c["precision"], c["compile_backend"]) for c in mine} == CELLS and len(mine) == len(CELLS)
        assert all(c["bare_img_s"] > 0 for c in mine)
        assert all((c["pipeline_over_bare"] or 0) > 0 for c in mine if c["compile_backend"])
    published = {(c["backbone"], c["compile_backend"] is not None) for c in cells if c["published_h100_img_s"]}
    assert published == {(b, compiled) for b in ("ViT-B", "ResNet152") for compiled in (False, True)}
    assert "precision x compile" in done.stdout and "~7,700 img/s" in done.stdout


def test_each_backbone_compiles_once_and_extract_run_compile_reuses_it(tmp_path: Path) -> None:
    """The budget's premise: the pipeline's models (fresh instances) run the bare forward's compiled code."""
    before = counters["stats"]["unique_graphs"]
    cells = gpu_check.precision_compile(gpu_check.SMOKE, tmp_path, compiled=True)
    assert counters["stats"]["unique_graphs"] - before == len(BACKBONES)
    assert {(c.backbone, c.precision, c.compile_backend) for c in cells} == {(b, *cell) for b in BACKBONES for cell in CELLS}


def test_no_compile_leaves_out_the_compiled_cells(tmp_path: Path) -> None:
    before = counters["stats"]["unique_graphs"]
    cells = gpu_check.precision_compile(gpu_check.SMOKE, tmp_path, compiled=False)
    assert counters["stats"]["unique_graphs"] == before
    assert [c.label for c in cells] == ["fp32", "bf16"] * len(BACKBONES) and all(c.bare_img_s > 0 for c in cells)


def test_a_compilation_that_fails_stops_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def planted(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
        raise RuntimeError("planted compile failure")

    monkeypatch.setitem(registry._BACKENDS, "planted_failure", None)  # registered for this test only
    monkeypatch.setitem(registry._COMPILER_FNS, "planted_failure", planted)
    monkeypatch.setattr(gpu_check, "SMOKE", replace(gpu_check.SMOKE, compile_backend="planted_failure"))
    monkeypatch.setattr(gpu_check, "extraction_ratios", lambda scale, work: [])  # straight to the compile step
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path))
    with pytest.raises(Exception, match="planted compile failure"):
        gpu_check.main(["--smoke"])
    assert not (tmp_path / "bench").exists()  # no table: the run failed
