"""`probe` end to end: a tiny real extraction, then the installed console script as a user types it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from extract.runner import ExtractConfig, extract
from probe.results import Ledger
from tests.conftest import cli
from tests.probe.caches import make_cache

TINY_DEIT = dict(embed_dim=32, depth=1, num_heads=2)


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cli("probe"), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)


@pytest.fixture
def demo_cache(isolated_outputs: Path) -> Path:
    config = ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=32, batch_size=64, workers=0,
                           overrides=TINY_DEIT, dataset_options={"per_class": 10})
    return extract(config).path


def test_probe_run_twice_trains_once_and_report_shows_the_row(demo_cache, isolated_outputs):
    first = probe("run", "--head", "linear", "--backbone", "deit", "--dataset", "demo", "--epochs", "3")
    assert first.returncode == 0, first.stderr
    assert "RANDOM" in first.stdout + first.stderr
    second = probe("run", "--head", "linear", "--backbone", "deit", "--dataset", "demo", "--epochs", "3")
    assert second.returncode == 0, second.stderr
    assert "already in the ledger" in second.stdout + second.stderr
    deit = probe("run", "--head", "deit", "--backbone", "deit", "--dataset", "demo", "--epochs", "1",
                 "--head-depth", "1", "--head-preset", "deit-t", "--batch-size", "8")
    assert deit.returncode == 0, deit.stderr
    assert [r.scenario for r in Ledger().rows()] == ["frozen-linear", "frozen-deit"]
    report = probe("report", "--dataset", "demo")
    assert report.returncode == 0, report.stderr
    assert "deit frozen-linear" in report.stdout and "deit frozen-deit" in report.stdout and "RANDOM" in report.stdout
    assert (isolated_outputs / "reports" / "report.png").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "--backbone", "dinov2", "--dataset", "demo"], "extract run --backbone dinov2 --dataset demo"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--max-ram", "lots"], "--max-ram"),
    (["report"], "no runs"),
])
def test_user_mistakes_give_one_error_line_and_exit_2(args, fragment, isolated_outputs):
    make_cache(isolated_outputs / "features" / "deit" / "demo-0123456789ab.h5")
    proc = probe(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
