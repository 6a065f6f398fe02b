"""The `extract` command as a user types it: listings work, mistakes give one line and exit 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([cli("extract"), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "--backbone", "nope", "--dataset", "demo"], ["unknown backbone 'nope'", "dinov2"]),
        (["run", "--backbone", "deit", "--dataset", "nope"], ["unknown dataset 'nope'", "imagefolder"]),
        (["run", "--backbone", "deit", "--dataset", "demo"], ["official weights for 'deit' not found", "MEDFM_WEIGHTS_DIR"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "/no/such.pth"], ["/no/such.pth does not exist"]),
        (["run", "--backbone", "deit", "--dataset", "imagefolder", "--root", "/no/such/dir", "--weights", "random"], ["/no/such/dir does not exist"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--batch-size", "0"], ["--batch-size must be", "got '0'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--batch-size", "many"], ["--batch-size must be", "got 'many'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--layers", "x"], ["--layers must be"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--device", "tpu:9"], ["unknown device 'tpu:9'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--precision", "fp8"], ["unknown precision 'fp8'"]),
        (["run", "--dataset", "demo"], ["Missing option '--backbone'"]),
        (["nope"], ["No such command 'nope'"]),
    ],
)
def test_user_mistakes_give_one_clear_line_and_exit_2(args: list[str], fragments: list[str], tmp_path: Path) -> None:
    assert_one_line_error(run(*args, cwd=tmp_path), *fragments)


def test_backbones_lists_the_registry_with_parameter_counts() -> None:
    proc = run("backbones")
    assert proc.returncode == 0, proc.stderr
    for name, params in [("dinov2", "86.58"), ("deit", "85.80"), ("resnet152", "58.14")]:
        row = next(line for line in proc.stdout.splitlines() if f" {name} " in line)
        assert params in row


def test_datasets_lists_the_registry_with_layouts() -> None:
    proc = run("datasets")
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "imagefolder" in proc.stdout
