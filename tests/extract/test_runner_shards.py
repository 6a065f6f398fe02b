"""Extraction under torchrun: one shard per process, joined by rank 0 into the cache one process would write."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.store import CacheReader, shard_path
from extract.runner import extract
from tests.conftest import REPO
from tests.extract.extractions import config
from tests.tiny import QUIET

TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
from tests.extract.extractions import config
from tests.tiny import QUIET
from extract.runner import extract
extract(config(Path(sys.argv[1])), QUIET)
"""


def contents(path: Path) -> dict[str, np.ndarray]:
    with CacheReader(path) as r:
        assert len(r.groups) == 5  # the splits and two augmented train views
        arrays = {f"{s}/{k}": r.features(s, k) for s in r.groups for k in r.feature_names(s)}
        return arrays | {f"{s}/ids": r.ids(s) for s in r.groups} | {f"{s}/labels": r.labels(s) for s in r.groups}


def assert_same_cache(got: Path, want: Path) -> None:
    """Same rows in the same order; features equal up to float rounding (the shards batch rows differently)."""
    a, b = contents(got), contents(want)
    assert a.keys() == b.keys()
    for key in b:
        if key.endswith(("/ids", "/labels")):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            np.testing.assert_allclose(a[key].astype(np.float32), b[key].astype(np.float32), rtol=2e-3, atol=1e-5, err_msg=key)


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", size)):
        monkeypatch.setenv(name, str(value))


def test_each_rank_writes_its_shard_and_rank_zero_joins_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol without torchrun: ranks share nothing but files, so each can run alone, in any order."""
    single = extract(config(tmp_path / "single"), QUIET).path
    out = tmp_path / "sharded"
    as_rank(monkeypatch, 1, 2)
    one = extract(config(out), QUIET)
    shard = shard_path(one.path, 1, 2)
    assert shard.exists() and not one.path.exists()  # rank 1 wrote rows 12-23 of train, 4-7 of val and test
    assert one.rows == {"train": 12, "val": 4, "test": 4}
    written = shard.stat().st_mtime_ns
    extract(config(out), QUIET)  # a rank whose shard is complete redoes nothing
    assert shard.stat().st_mtime_ns == written

    as_rank(monkeypatch, 0, 2)
    zero = extract(config(out), QUIET)
    assert zero.path == one.path and zero.rows == {"train": 24, "val": 8, "test": 8}
    assert not list(out.rglob("*.shard*")) and zero.path.with_suffix(".splits.json").exists()
    assert_same_cache(zero.path, single)
    with CacheReader(zero.path) as r, CacheReader(single) as s:
        assert r.fingerprint == s.fingerprint and r.meta.skipped == ()


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_torchrun_with_two_processes_writes_the_same_cache_as_one(tmp_path: Path) -> None:
    script = tmp_path / "extract_two.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*torchrun, str(script), str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    joined = list((tmp_path / "two").rglob("*.h5"))
    assert len(joined) == 1 and not list((tmp_path / "two").rglob("*.shard*"))
    assert_same_cache(joined[0], extract(config(tmp_path / "one"), QUIET).path)
