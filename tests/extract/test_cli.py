"""The `extract` command as a user types it: listings work, mistakes give one line and exit 2.

The installed console script runs once in a subprocess; every other case runs its `main` in this process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from extract.cli import main
from tests.conftest import cli
from tests.tiny import run_main


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_the_installed_command_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([cli("extract"), "run", "--backbone", "nope", "--dataset", "demo"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "unknown backbone 'nope'", "dinov2")


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
def test_user_mistakes_give_one_clear_line_and_exit_2(args: list[str], fragments: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_main(main, args, monkeypatch), *fragments)
    assert not list(tmp_path.rglob("*.h5*"))  # nothing written


def test_backbones_lists_the_registry_with_parameter_counts(monkeypatch) -> None:
    code, out, err = run_main(main, ["backbones"], monkeypatch)
    assert code == 0, err
    for name, params in [("dinov2", "86.58"), ("deit", "85.80"), ("resnet152", "58.14")]:
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert params in row


def test_datasets_lists_the_registry_with_layouts(monkeypatch) -> None:
    code, out, err = run_main(main, ["datasets"], monkeypatch)
    assert code == 0, err
    assert "demo" in out and "imagefolder" in out
