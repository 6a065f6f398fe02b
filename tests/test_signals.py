"""Ctrl-C (SIGINT) and SIGTERM stop a busy command with one line saying what was kept, and exit 130 / 143.

Each case starts the real command in a subprocess on the `killable-demo` dataset, which pauses at one
image (so the command is mid-work when the signal comes), then checks the message, the exit code and
that what was kept resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract
from tests.conftest import REPO
from tests.extract import killable
from tests.tiny import QUIET, TINY_VIT_DEEP

EXTRACT = ["run", "--backbone", "deit", "--dataset", "killable-demo", "--weights", "random", "--image-size", "32",
           "--batch-size", "4", "--workers", "0", "--opt", "per_class=10"]


def start(command: str, args: list[str], tmp_path: Path, pause_at: int) -> tuple[subprocess.Popen, Path]:
    """`command`'s console entry (extract, finetune) with killable-demo registered, paused at demo image `pause_at`."""
    marker = tmp_path / "paused"
    env = {**os.environ, killable.PAUSE_ENV: f"{pause_at}:{marker}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = f"from tests.extract import killable; from {command}.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, marker


def stop_when_paused(proc: subprocess.Popen, marker: Path, signum: int) -> tuple[str, str]:
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the command never reached the pause point"
        time.sleep(0.1)
    time.sleep(0.5)  # let the writer thread flush what it has
    proc.send_signal(signum)
    return proc.communicate(timeout=120)


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_extract_with_one_line_and_the_partial_cache_resumes(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "features"
    proc, marker = start("extract", [*EXTRACT, "--out", str(out)], tmp_path, pause_at=20)
    _, err = stop_when_paused(proc, marker, signum)

    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted; the partial cache (.h5.partial) keeps every row written so far, "
                                            "and the same `extract run` resumes from there")
    (partial,) = out.rglob("*.h5.partial")
    assert not list(out.rglob("*.h5"))
    with h5py.File(partial, "r") as file:
        kept = sum(int(file[s].attrs["rows"]) for s in ("train", "val", "test"))
    assert kept > 0

    resumed = extract(ExtractConfig(backbone="deit", dataset="killable-demo", weights="random", image_size=32, batch_size=4,
                                    workers=0, out=out, dataset_options={"per_class": 10}), QUIET)
    assert resumed.path == partial.with_name(partial.name.removesuffix(".partial"))
    assert resumed.extracted == 40 - kept  # the rows written before the signal were kept, not redone


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_sigterm_stops_finetune_with_one_line_that_says_how_to_resume(tmp_path: Path) -> None:
    train_image = int(get_dataset("demo", None, per_class=8).splits["train"].ids[3].removeprefix("demo-"))
    args = ["run", "--backbone", "deit", "--dataset", "killable-demo", "--weights", "random", "--image-size", "32",
            "--batch-size", "4", "--workers", "0", "--epochs", "2", "--no-augment", "--head-depth", "1", "--head-preset", "deit-t",
            "--head-weights", "random", "--device", "cpu", "--out", str(tmp_path / "runs"), "--opt", "per_class=8"]
    args += [a for k, v in TINY_VIT_DEEP.items() for a in ("--override", f"{k}={v}")]
    proc, marker = start("finetune", args, tmp_path, pause_at=train_image)
    _, err = stop_when_paused(proc, marker, signal.SIGTERM)

    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted; the run's checkpoint keeps every finished epoch: rerun the same "
                                            "`finetune run` with --resume to continue from there")


class _SignalsInFinalizer:
    """Sends SIGTERM from a finalizer, where Python ignores an exception: as when the signal lands in an at-fork hook."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # the handler runs here; its exception is printed as ignored, not raised


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, reported by Python
def test_a_sigterm_whose_exception_python_swallowed_still_ends_the_command_as_interrupted(monkeypatch, capsys) -> None:
    import typer

    from common.cli import run_cli

    app = typer.Typer()

    @app.command()
    def work() -> None:
        _SignalsInFinalizer()  # collected at once: the signal arrives and its exception is lost

    @app.command()
    def other() -> None:  # two commands, so typer dispatches by name
        pass

    monkeypatch.setattr(sys, "argv", ["prog", "work"])
    with pytest.raises(SystemExit) as ended:
        run_cli(app, "prog", interrupted="interrupted; rerun to resume")
    assert ended.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().endswith("interrupted; rerun to resume")


SWALLOWING_COMMAND = """
import os, signal, sys, time
import typer
from common.cli import run_cli

class SignalsInFinalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # the handler runs here; its exception is printed as ignored, not raised

app = typer.Typer()

@app.command()
def work() -> None:
    SignalsInFinalizer()
    started = time.perf_counter()
    while time.perf_counter() - started < 20:  # a command that would go on for 20 s
        sum(range(1000))
    print("finished")

@app.command()
def other() -> None:
    pass

sys.argv = ["prog", "work"]
run_cli(app, "prog", interrupted="interrupted")
"""


@pytest.mark.slow  # a subprocess: the swallowed exception must not be kept alive by pytest's hooks
def test_a_sigterm_whose_exception_python_swallowed_is_sent_again_and_stops_the_command_promptly() -> None:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", SWALLOWING_COMMAND], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "finished" not in done.stdout and done.stderr.strip().endswith("interrupted")
    assert time.perf_counter() - started < 15  # stopped long before the command's 20 s
