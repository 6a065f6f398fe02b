"""`probe` end to end: a tiny real extraction, then the installed console script as a user types it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cache.errors import MedfmError
from extract.runner import ExtractConfig, extract
from probe.cli import report
from probe.data import open_cache
from probe.results import Ledger
from probe.run import run_probe
from probe.train import TrainConfig
from tests.conftest import cli

TINY_DEIT = dict(embed_dim=32, depth=1, num_heads=2)


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cli("probe"), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)


@pytest.fixture
def demo_cache(isolated_outputs: Path) -> Path:
    config = ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=32, batch_size=64, workers=0,
                           overrides=TINY_DEIT, dataset_options={"per_class": 10})
    return extract(config).path


def test_probe_run_twice_trains_once_and_report_shows_the_row(demo_cache, isolated_outputs):
    args = ["run", "--head", "deit", "--backbone", "deit", "--dataset", "demo", "--epochs", "1",
            "--head-depth", "1", "--head-preset", "deit-t", "--batch-size", "8"]
    first = probe(*args)
    assert first.returncode == 0, first.stderr
    assert "RANDOMLY initialised deit" in first.stdout + first.stderr  # the backbone's random weights, said loudly
    assert "DeiT head starts from RANDOM weights" in first.stdout + first.stderr
    second = probe(*args)
    assert second.returncode == 0, second.stderr
    assert "already in the ledger" in second.stdout + second.stderr
    with open_cache(demo_cache, "deit", "demo") as reader:
        run_probe(reader, TrainConfig(epochs=2, batch_size=16))
    assert [r.scenario for r in Ledger().rows()] == ["frozen-deit", "frozen-linear"]
    report = probe("report", "--dataset", "demo")
    assert report.returncode == 0, report.stderr
    assert "deit frozen-linear" in report.stdout and "deit frozen-deit" in report.stdout and "RANDOM" in report.stdout
    assert (isolated_outputs / "reports" / "report.png").exists()


def test_a_user_mistake_gives_one_error_line_and_exit_2(isolated_outputs):
    proc = probe("run", "--backbone", "dinov2", "--dataset", "demo")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "run `extract run --backbone dinov2 --dataset demo` first" in lines[0]


def test_report_of_an_empty_ledger_says_to_train_first():
    with pytest.raises(MedfmError, match="probe run"):
        report(dataset=None, out=None, ledger=None)
