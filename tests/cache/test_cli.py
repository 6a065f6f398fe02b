"""`cache ls | info | verify | rm` on real files, and their one-line errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.cli import main
from cache.store import CacheWriter, partial_path, shard_path
from common.locks import acquire
from tests.cache.plans import FP, make_plan, write_all, write_shard
from tests.conftest import cli
from tests.tiny import META, run_main


def cache_cmd(*args: str, columns: int = 250) -> subprocess.CompletedProcess:
    return subprocess.run([cli("cache"), *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": str(columns), "PATH": "/usr/bin:/bin"})


def make_cache(root: Path, complete: bool = True) -> Path:
    path = root / "deit" / "demo-abc.h5"
    writer = CacheWriter.open(path, META, make_plan(n=4))
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
    assert len(lines) == 2 and "4/4/4" in lines[0] and "2/0/0" in lines[1]  # rows written per split
    assert "(incomplete: 2 of 12 rows)" in out and out.count("incomplete") == 1


def test_ls_keeps_every_header_whole_at_80_columns(tmp_path: Path) -> None:
    make_cache(tmp_path / "a-rather-long-folder-name-for-a-cache-root" / "and-deeper")
    out = cache_cmd("ls", str(tmp_path), columns=80).stdout
    header = next(line for line in out.splitlines() if "backbone" in line)
    assert header.split() == ["backbone", "dataset", "rows", "size", "file", "settings"]
    assert max(map(len, out.splitlines())) <= 80


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
    unfinished = CacheWriter.open(shard_path(path, 1, 2), META, plan)
    unfinished.close()
    (tmp_path / "deit" / "demo-abc.splits.json").write_text("{}")
    listed = cache_cmd("ls", str(tmp_path)).stdout
    assert "demo-abc.h5.shard0of2" in listed and "demo-abc.h5.shard1of2.partial" in listed
    assert cache_cmd("rm", str(shard), str(partial_path(shard_path(path, 1, 2)))).returncode == 0
    assert not list(tmp_path.rglob("*.shard*"))
    assert (tmp_path / "deit" / "demo-abc.splits.json").exists()  # the cache's manifest is not a shard's to remove


def broken_files(folder: Path) -> dict[str, Path]:
    """A truncated cache, a text file with a cache's name, and another program's HDF5 file."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_cache(folder / "good")
    files = {"truncated": folder / "trunc.h5", "text": folder / "important.h5", "foreign": folder / "foreign.h5"}
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"].write_text("my notes, not a cache")
    with h5py.File(files["foreign"], "w") as f:
        f["x"] = np.arange(3)
    return files


@pytest.mark.parametrize(("kind", "fragment"), [
    ("truncated", "does not open as HDF5 (Unable to synchronously open file (truncated file"),
    ("text", "is not an HDF5 file, so not a medfm cache"),
    ("foreign", "is an HDF5 file but not a medfm cache"),
])
def test_info_on_a_broken_or_foreign_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, fragment: str) -> None:
    path = broken_files(tmp_path)[kind]
    code, out, err = run_main(main, ["info", str(path)], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path} {fragment}"), err


def test_rm_removes_only_medfm_caches_and_a_damaged_one_only_with_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = broken_files(tmp_path)
    for kind in ("text", "foreign", "truncated"):
        code, _, err = run_main(main, ["rm", str(files[kind])], monkeypatch)
        assert code == 2 and "nothing removed" in err and files[kind].exists(), err
    for kind in ("text", "foreign"):  # --force never removes a file that opens and is not a cache
        code, _, err = run_main(main, ["rm", "--force", str(files[kind])], monkeypatch)
        assert code == 2 and files[kind].exists(), err
    code, out, err = run_main(main, ["rm", "--force", str(files["truncated"])], monkeypatch)
    assert code == 0 and not files["truncated"].exists(), err
    partial = make_cache(tmp_path / "p", complete=False)
    with acquire(Path(str(partial).removesuffix(".partial")), "a test extraction"):  # an extraction writing it now
        code, _, err = run_main(main, ["rm", str(partial)], monkeypatch)
        assert code == 2 and "is being written by process" in err and partial.exists(), err
    code, _, err = run_main(main, ["rm", str(partial)], monkeypatch)
    assert code == 0 and not partial.exists(), err


def test_ls_shows_folder_size_and_the_settings_that_tell_same_named_caches_apart(tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    inputs = {"transform": {"size": 224, "channels": 3, "interpolation": "bicubic"}, "norm": {"kind": "model"}, "layers": [11]}
    for name, settings in (("demo-aaa.h5", {**inputs, "root": "/data/ward-a"}),
                           ("demo-bbb.h5", {**inputs, "root": "/data/ward-b", "transform": {**inputs["transform"], "size": 112}})):
        writer = CacheWriter.open(tmp_path / "deit" / name, replace(META, settings=settings), make_plan(n=4))
        write_all(writer)
        writer.finalize()
    monkeypatch.setenv("COLUMNS", "300")
    code, out, err = run_main(main, ["ls", str(tmp_path)], monkeypatch)
    assert code == 0, err
    rows = {line.split()[5]: line for line in out.splitlines() if "demo-" in line}  # the file, under the listed folder
    assert set(rows) == {"deit/demo-aaa.h5", "deit/demo-bbb.h5"}
    assert "224 px, 3 ch, norm model, bicubic, root=/data/ward-a" in rows["deit/demo-aaa.h5"]
    assert "112 px, 3 ch, norm model, bicubic, root=/data/ward-b" in rows["deit/demo-bbb.h5"]
    assert all(" KB" in line for line in rows.values()) and f"caches under {tmp_path}" in out
