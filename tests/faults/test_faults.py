"""Faults a real user meets: two identical runs at once, runs killed part-way, a full disk.

Each test starts real processes or mounts a real small filesystem; the guarantees they check are the
table "What is guaranteed" in the README.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache.layout import open_cache
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan, partial_path, verify
from common.errors import MedfmError
from extract.runner import extract
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.run import run_probe
from probe.sweep import expand, run_sweep
from tests.conftest import REPO
from tests.extract import killable
from tests.extract.extractions import config
from tests.faults.sweeps import BASE, GRID
from tests.probe.caches import make_cache
from tests.tiny import META, QUIET

EXTRACT_SCRIPT = """
import sys
from pathlib import Path
from rich.console import Console
from tests.extract import killable
from tests.extract.extractions import config
from extract.runner import extract
extract(config(Path(sys.argv[1]), dataset="killable-demo", batch_size=4), Console(stderr=True))
"""

SWEEP_SCRIPT = """
import sys
from pathlib import Path
from cache.layout import open_cache
from probe.sweep import expand, run_sweep
from tests.faults.sweeps import BASE, GRID
from common.progress import Pace
Pace.quiet_below = 0  # the training loop says its estimate after its first steps, however short the run: the sign it trains
with open_cache(Path(sys.argv[1]), None, None) as reader:
    run_sweep(reader, expand(reader, GRID, BASE), device="cpu")
"""
TRAINING = re.compile(r"4 linear head\(s\): about .* for the whole run \(estimated from the first 20 of 3600 steps\)")


def start(script: str, *args: str, env: dict[str, str] | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=stderr)


def wait_for(proc: subprocess.Popen, done, what: str, limit: float = 120, said=None) -> None:
    """Poll `done` until it holds; fail with what the process said (`said()`, else its stderr pipe) if it ends first."""
    deadline = time.monotonic() + limit
    while not done():
        assert proc.poll() is None, said() if said else proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    with CacheReader(path) as r:
        return {f"{s}/{k}": r.features(s, k) for s in r.splits for k in r.feature_names(s)} | {f"{s}/ids": r.ids(s) for s in r.splits}


@pytest.mark.slow
def test_two_identical_extractions_at_once_one_writes_the_other_stops_in_one_line(tmp_path: Path) -> None:
    out, marker, release = tmp_path / "out", tmp_path / "paused", tmp_path / "go-on"
    first = start(EXTRACT_SCRIPT, str(out), env={killable.PAUSE_ENV: f"20:{marker}:{release}"})
    wait_for(first, marker.exists, "the first extraction's pause point")
    (held,) = list(out.rglob("*.h5.partial"))
    with pytest.raises(MedfmError) as err:
        extract(config(out, dataset="killable-demo", batch_size=4), QUIET)
    assert f"is being written by process {first.pid} on" in str(err.value) and "\n" not in str(err.value)
    assert held.exists()  # the loser touched nothing of the winner's
    release.write_text("")
    assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    again = extract(config(out, dataset="killable-demo", batch_size=4), QUIET)
    clean = extract(config(tmp_path / "clean", dataset="killable-demo", batch_size=4), QUIET)
    assert again.reused and verify(again.path) == []
    got, want = cache_arrays(again.path), cache_arrays(clean.path)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_two_identical_probe_runs_at_once_train_once(tmp_path: Path, isolated_outputs: Path) -> None:
    """The second one stops in one line while the first trains; the ledger ends with one row, not two."""
    path = make_cache(tmp_path / "c.h5")
    script = ("import sys; from pathlib import Path; from cache.layout import open_cache; from probe.run import run_probe; "
              "from probe.config import TrainConfig\n"
              "with open_cache(Path(sys.argv[1]), None, None) as r: run_probe(r, TrainConfig(epochs=300, batch_size=16), device='cpu')")
    first = start(script, str(path))
    locks = isolated_outputs / "runs" / "locks"
    wait_for(first, lambda: locks.exists() and any(locks.iterdir()), "the first run's claim")
    with open_cache(path, None, None) as reader, pytest.raises(MedfmError, match=f"is being written by process {first.pid}"):
        run_probe(reader, TrainConfig(epochs=300, batch_size=16), device="cpu", console=QUIET)
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    with open_cache(path, None, None) as reader:
        assert run_probe(reader, TrainConfig(epochs=300, batch_size=16), device="cpu", console=QUIET).skipped
    assert len(Ledger().rows()) == 1


@pytest.mark.slow
def test_a_sweep_killed_part_way_resumes_to_the_results_of_an_uninterrupted_one(tmp_path: Path, isolated_outputs: Path) -> None:
    """Killed once its four heads are training (the loop's estimate, said after their first 20 of 3600 steps), before
    they finish: it dies holding the four runs' claims, having recorded nothing; the rerun trains all four."""
    path, log = make_cache(tmp_path / "c.h5"), tmp_path / "sweep.log"
    with log.open("w") as stderr:
        sweep = start(SWEEP_SCRIPT, str(path), stderr=stderr)
    said = log.read_text
    try:
        wait_for(sweep, lambda: TRAINING.search(said()), "the heads' first training steps", said=said)
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    assert sweep.returncode == -signal.SIGKILL, said()  # the kill ended it, not the end of its 400 epochs
    assert TRAINING.search(said())  # its heads had trained 20 steps
    assert "trained 4 linear head(s)" not in said()  # the group had not finished
    locks = isolated_outputs / "runs" / "locks"
    holders = [f.read_text() for f in locks.iterdir()]
    assert len(holders) == 4 and all(h.startswith(f"process {sweep.pid} ") for h in holders)  # killed inside its claims
    ledger = isolated_outputs / "runs" / "results.sqlite"
    assert not ledger.exists() or Ledger(ledger).rows() == []  # nothing half-recorded
    with open_cache(path, None, None) as reader:
        resumed = run_sweep(reader, expand(reader, GRID, BASE), device="cpu", console=QUIET)
        clean = run_sweep(reader, expand(reader, GRID, BASE), device="cpu", console=QUIET, force=True,
                          ledger=Ledger(tmp_path / "clean.sqlite"))
    assert resumed.trained == 4 and list(locks.iterdir()) == []  # the killed one's claims taken over, then released
    assert [(r.config["lr"], r.seed, r.val_score, r.test_primary) for r in resumed.records] == \
           [(r.config["lr"], r.seed, r.val_score, r.test_primary) for r in clean.records]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 4 MiB filesystem (tmpfs), mounted for the test and removed after it; needs root, as CI has."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Fill the filesystem of `folder` to the last block."""
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
        except OSError:
            pass


def big_plan(n: int = 40) -> dict[str, SplitPlan]:
    return {"train": SplitPlan([f"r{i}" for i in range(n)], np.zeros(n, dtype=np.int64), {"tokens": FeatureSpec((64, 64), "float32")})}


@pytest.mark.slow
def test_a_cache_larger_than_the_free_disk_is_refused_in_one_line_before_any_row(small_disk: Path) -> None:
    with pytest.raises(MedfmError, match=r"needs .* MiB but .* has .* MiB free; free space"):
        CacheWriter.open(small_disk / "c.h5", META, big_plan(n=400))  # about 6.5 MiB on a 4 MiB disk
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_a_disk_filled_by_someone_else_mid_run_does_not_stop_the_extraction(small_disk: Path) -> None:
    """The writer reserved its blocks when it opened the file: filling the disk afterwards takes nothing from it."""
    writer = CacheWriter.open(small_disk / "c.h5", META, big_plan())
    fill(small_disk)
    rows = np.random.default_rng(0).standard_normal((40, 64, 64)).astype(np.float32)
    for start in range(0, 40, 8):
        writer.write("train", start, {"tokens": rows[start : start + 8]})
    path = writer.finalize()
    assert verify(path) == []
    with CacheReader(path) as reader:
        np.testing.assert_array_equal(reader.features("train", "tokens"), rows)
    assert not partial_path(path).exists()
