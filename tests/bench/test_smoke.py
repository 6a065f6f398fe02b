"""Benchmarks that cannot rot: every benchmark's `--smoke` mode runs its whole code path (the same functions, called
the same way, at tiny sizes), so a call the production code no longer accepts fails `make test`, not the next `make bench`.

In this process where a smoke run takes a few seconds; `memory` and `sweep` start processes of their own (two fresh
extractions; `probe run` and `probe sweep` commands), so they are marked slow, as is the one test of `python -m bench --smoke`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_cli
from bench import cache_vs_online
from bench.common import REPO, SUMMARY_ENV, at_least, record, run_bench
from common.errors import MedfmError
from probe.train import train_head

IN_PROCESS = ("bootstrap", "cache_vs_online", "deit_head", "extraction", "images", "reads", "tokens")
STARTS_PROCESSES = ("memory", "sweep")


def test_every_benchmark_has_a_smoke_test() -> None:
    assert sorted(IN_PROCESS + STARTS_PROCESSES) == sorted(bench_cli.BENCHES)


@pytest.mark.parametrize("name", [*IN_PROCESS, *(pytest.param(n, marks=pytest.mark.slow) for n in STARTS_PROCESSES)])
def test_smoke_mode_runs_the_benchmark_and_records_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    summary = tmp_path / "summary.json"
    monkeypatch.setenv(SUMMARY_ENV, str(summary))
    entry = importlib.import_module(f"bench.{name}").main(smoke=True)
    assert entry["bench"] == name and entry["ratios"] and all(v == v for v in entry["ratios"].values())  # no NaN
    assert not summary.exists()  # the real summary never sees tiny sizes
    out = capsys.readouterr().out
    assert f"{name}: " in out and "smoke: tiny sizes, no target" in out and "MISSED" not in out


def test_a_planted_wrong_argument_fails_the_smoke_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug the smoke mode was built for: cache_vs_online handed `train_head` the task as a dict (`task.to_dict()`)
    once `train_head` took a `Task`. Planted back, the smoke run must raise, not pass quietly."""

    def old_call(config, source, task, dev):  # what bench/cache_vs_online.py used to pass
        return train_head(config, source, task.to_dict(), dev)

    monkeypatch.setattr(cache_vs_online, "train_head", old_call)
    with pytest.raises(AttributeError, match="dict"):
        cache_vs_online.main(smoke=True)


def test_a_failing_benchmark_fails_its_command_and_the_smoke_run(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def broken(smoke: bool) -> None:
        raise TypeError("train_head() got an unexpected keyword argument 'task'")

    with pytest.raises(TypeError):  # an unexpected error: a traceback and exit status 1
        run_bench(broken, ["--smoke"])

    def refused(smoke: bool) -> None:
        raise MedfmError("no such cache")

    with pytest.raises(SystemExit) as exit_:  # a user error: one line and exit status 2
        run_bench(refused, ["--smoke"])
    assert exit_.value.code == 2

    calls: list[tuple[str, bool]] = []

    def fake(name: str):
        def main(smoke: bool) -> None:
            calls.append((name, smoke))
            if name == "reads":
                raise TypeError("read_rows() got an unexpected keyword argument")
        return main

    for name in ("reads", "bootstrap"):
        monkeypatch.setattr(importlib.import_module(f"bench.{name}"), "main", fake(name))
    assert bench_cli.main(["--smoke", "reads", "bootstrap"]) == 1  # the smoke run goes on past a failure, then fails
    assert calls == [("reads", True), ("bootstrap", True)]
    captured = capsys.readouterr()
    assert "failed to run: reads" in captured.out and "TypeError: read_rows()" in captured.err


def test_smoke_records_serialise_the_entry_but_append_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.json"
    monkeypatch.setenv(SUMMARY_ENV, str(summary))
    record("first", {"a_over_b": 0.5}, {"a_over_b": at_least(1.0)}, {"rows": 3}, smoke=True)
    assert not summary.exists()
    with pytest.raises(TypeError, match="not JSON serializable"):  # what the real run could not save fails the smoke run too
        record("first", {"a_over_b": 0.5}, {}, {"path": tmp_path}, smoke=True)
    record("first", {"a_over_b": 0.5}, {}, {"rows": 3})
    assert [e["bench"] for e in json.loads(summary.read_text())] == ["first"]


@pytest.mark.slow
def test_python_m_bench_smoke_runs_from_the_command_line(tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    env = {**os.environ, SUMMARY_ENV: str(summary), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "reads"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "reads: hdf5_over_memmap = " in done.stdout and "smoke: 1 of 1 benchmarks ran" in done.stdout
    assert not summary.exists()
