"""`cache ls | info | verify | rm` on real files, and their one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from cache.store import CacheWriter, partial_path, shard_path
from tests.cache.test_store import FP, make_plan, write_all, write_shard
from tests.conftest import cli
from tests.tiny import META


def cache_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([cli("cache"), *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"})


def make_cache(root: Path, complete: bool = True) -> Path:
    path = root / "deit" / "demo-abc.h5"
    writer = CacheWriter.open(path, FP, META, make_plan(n=4))
    if complete:
        write_all(writer)
        return writer.finalize()
    writer.write("train", 0, {"pooled": np.zeros((2, 4), np.float32), "tokens": np.zeros((2, 3, 2), np.float16)})
    writer.close()
    return Path(str(path) + ".partial")


def test_ls_shows_complete_and_partial_caches(tmp_path: Path) -> None:
    make_cache(tmp_path / "a")
    make_cache(tmp_path / "b", complete=False)
    out = cache_cmd("ls", str(tmp_path)).stdout
    lines = [line for line in out.splitlines() if "deit" in line]
    assert len(lines) == 2
    assert any("yes" in line for line in lines) and any("2/4" in line and " no " in line for line in lines)


def test_verify_passes_a_sound_file_and_fails_a_partial_one(tmp_path: Path) -> None:
    good = cache_cmd("verify", str(make_cache(tmp_path / "a")))
    bad = cache_cmd("verify", str(make_cache(tmp_path / "b", complete=False)))
    assert good.returncode == 0 and "ok" in good.stdout
    assert bad.returncode == 1 and "not marked complete" in bad.stdout


def test_info_prints_the_recorded_meta(tmp_path: Path) -> None:
    proc = cache_cmd("info", str(make_cache(tmp_path)))
    assert proc.returncode == 0 and FP in proc.stdout and '"deit"' in proc.stdout


def test_rm_deletes_and_refuses_what_is_not_a_cache(tmp_path: Path) -> None:
    path = make_cache(tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    refused = cache_cmd("rm", str(other))
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and other.exists()
    assert cache_cmd("rm", str(path)).returncode == 0 and not path.exists()


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    proc = cache_cmd("verify", str(tmp_path / "none.h5"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: cache file {tmp_path / 'none.h5'} does not exist; list caches with `cache ls`"


def test_ls_lists_the_shards_of_a_torchrun_extraction_and_rm_removes_them(tmp_path: Path) -> None:
    path, plan = tmp_path / "deit" / "demo-abc.h5", make_plan(n=4)
    shard = write_shard(path, plan, 0, 2)
    unfinished = CacheWriter.open(shard_path(path, 1, 2), FP, META, plan)
    unfinished.close()
    (tmp_path / "deit" / "demo-abc.splits.json").write_text("{}")
    listed = cache_cmd("ls", str(tmp_path)).stdout
    assert "demo-abc.h5.shard0of2" in listed and "demo-abc.h5.shard1of2.partial" in listed
    assert cache_cmd("rm", str(shard), str(partial_path(shard_path(path, 1, 2)))).returncode == 0
    assert not list(tmp_path.rglob("*.shard*"))
    assert (tmp_path / "deit" / "demo-abc.splits.json").exists()  # the cache's manifest is not a shard's to remove
