"""The cache contract: write by index, resume, finalize last, refuse incomplete or mismatched files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.store import CacheReader, CacheWriter, join_shards, partial_path, verify
from common.errors import MedfmError
from tests.cache.plans import FP, make_plan, rows_for, write_all, write_shard
from tests.tiny import META

OTHER = replace(META, settings={"norm": {"kind": "study"}})  # other extraction settings


def test_complete_file_round_trips_rows_labels_and_meta(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan())
    write_all(writer)
    writer.finalize()
    assert not partial_path(path).exists()
    with CacheReader(path) as reader:
        assert reader.fingerprint == FP and reader.meta == META and reader.task == META.task
        assert reader.ids("val")[3] == "val-3"
        np.testing.assert_array_equal(reader.labels("train"), np.arange(10) % 3)
        np.testing.assert_array_equal(reader.features("test")[:, 0], np.arange(10) + 200)
        assert reader.features("train", "tokens").dtype == np.float16
        chunks = list(reader.iter_slices("train", "tokens"))
        assert sum(len(a) for _, a in chunks) == 10
    assert verify(path) == []


def test_partial_file_is_refused_by_reader_and_resumed_by_writer(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    plan = make_plan()
    writer = CacheWriter.open(path, META, plan)
    writer.write("train", 0, rows_for("train", 0, 4))
    writer.close()
    with pytest.raises(MedfmError, match="incomplete"):
        CacheReader(path)
    resumed = CacheWriter.open(path, META, plan)
    assert resumed.rows("train") == 4 and resumed.rows("val") == 0
    write_all(resumed)
    resumed.finalize()
    with CacheReader(path) as reader:
        np.testing.assert_array_equal(reader.features("train")[:, 0], np.arange(10))


def test_partial_file_with_other_fingerprint_is_started_over(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan())
    writer.write("train", 0, rows_for("train", 0, 4))
    writer.close()
    fresh = CacheWriter.open(path, OTHER, make_plan())
    assert fresh.rows("train") == 0
    fresh.close()


def test_finalize_refuses_short_splits_and_leaves_no_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan())
    writer.write("train", 0, rows_for("train", 0, 10))
    with pytest.raises(MedfmError, match="has 0 of 10 rows"):
        writer.finalize()
    writer.close()
    assert not path.exists()
    assert "not marked complete" in verify(partial_path(path))


def test_complete_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan(n=2))
    write_all(writer)
    writer.finalize()
    with pytest.raises(MedfmError, match="already exists"):
        CacheWriter.open(path, META, make_plan(n=2))


def test_verify_reports_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan(n=4))
    write_all(writer)
    writer.finalize()
    with h5py.File(path, "r+") as f:
        f["val/pooled"][2, 1] = np.nan
    assert any("val/pooled: non-finite" in p for p in verify(path))


def test_invalid_rows_are_dropped_by_reader(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan(n=4))
    for split in ("train", "val", "test"):
        writer.write(split, 0, rows_for(split, 0, 4), valid=np.array([True, False, True, True]))
    writer.finalize()
    with CacheReader(path) as reader:
        assert list(reader.ids("train")) == ["train-0", "train-2", "train-3"]
        assert len(reader.features("train")) == len(reader.labels("train")) == 3


def test_shards_join_in_rank_order_with_their_skipped_rows_then_go(tmp_path: Path) -> None:
    path, plan = tmp_path / "c.h5", make_plan(n=10)
    shards = [write_shard(path, plan, rank, 3, bad="train-7") for rank in range(3)]  # blocks of 3, 3 and 4 rows
    join_shards(shards, path, META, plan)
    assert not any(s.exists() for s in shards)
    with CacheReader(path) as r:
        assert r.meta.skipped == ("train-7",)
        assert r.ids("train").tolist() == [f"train-{i}" for i in range(10) if i != 7]
        assert r.ids("test").tolist() == [f"test-{i}" for i in range(10)]
        np.testing.assert_array_equal(r.features("test"), rows_for("test", 0, 10)["pooled"])
        np.testing.assert_array_equal(r.features("train", "tokens"), np.delete(rows_for("train", 0, 10)["tokens"], 7, axis=0))


def test_a_shard_of_other_settings_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    path, plan = tmp_path / "c.h5", make_plan(n=4)
    shards = [write_shard(path, plan, 0, 2), write_shard(path, plan, 1, 2, meta=OTHER)]
    with pytest.raises(MedfmError, match="other extraction settings"):
        join_shards(shards, path, META, plan)
    assert all(s.exists() for s in shards) and not path.exists()


def complete_cache(path: Path, n: int = 4) -> Path:
    writer = CacheWriter.open(path, META, make_plan(n=n))
    write_all(writer)
    return writer.finalize()


@pytest.mark.parametrize("array", ["pooled", "tokens"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_verify_finds_one_flipped_byte_in_any_array_of_any_split(tmp_path: Path, split: str, array: str) -> None:
    path = complete_cache(tmp_path / "c.h5")
    assert verify(path) == []
    with h5py.File(path, "r") as f:
        ds = f[f"{split}/{array}"]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
    at = offset + 2 * row_bytes + 1  # a byte of row 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10  # one bit: the value stays finite
    path.write_bytes(bytes(data))
    assert f"{split}/{array}: 1 row(s) differ from their checksums (first: row 2)" in verify(path)


def test_verify_finds_shuffled_labels_and_edited_ids(tmp_path: Path) -> None:
    path = complete_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["train/labels"][:] = f["train/labels"][:][::-1]
        f["val/ids"][0] = "someone-else"
    problems = verify(path)
    assert "train/labels: differs from its checksum" in problems and "val/ids: differs from its checksum" in problems


def test_edited_meta_is_found_by_verify_and_refused_by_readers(tmp_path: Path) -> None:
    path = complete_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["meta"] = f.attrs["meta"].replace('"random_weights": false', '"random_weights": true')
    assert "meta: changed after extraction (checksum mismatch)" in verify(path)
    with pytest.raises(MedfmError, match="its meta was changed after extraction"):
        CacheReader(path)


def test_a_second_writer_of_the_same_cache_stops_before_touching_the_first_ones_file(tmp_path: Path) -> None:
    path, plan = tmp_path / "c.h5", make_plan()
    first = CacheWriter.open(path, META, plan)
    first.write("train", 0, rows_for("train", 0, 4))
    with pytest.raises(MedfmError, match=r"the cache .*c\.h5 is being written by process \d+ on .* since"):
        CacheWriter.open(path, META, plan)
    with pytest.raises(MedfmError, match="is being written by process"):
        CacheReader(path)  # a reader is told to wait, not to remove the file
    assert first.rows("train") == 4 and partial_path(path).exists()
    write_all(first)
    first.finalize()
    assert verify(path) == [] and not (tmp_path / "c.h5.lock").exists()


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path: Path) -> None:
    """flock dies with its process: a stale lock file of a killed writer does not block the next one."""
    import subprocess
    import sys

    path = tmp_path / "c.h5"
    script = f"from pathlib import Path; from common.locks import acquire; acquire(Path({str(path)!r}), 'x'); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[2])
    assert (tmp_path / "c.h5.lock").exists()  # left behind, as a killed process leaves it
    writer = CacheWriter.open(path, META, make_plan())
    write_all(writer)
    assert writer.finalize() == path


def test_an_incomplete_file_under_the_final_name_says_to_remove_it_not_to_rerun(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan())
    writer.close()
    partial_path(path).rename(path)
    with pytest.raises(MedfmError, match=r"carries a final name but is not marked complete; remove it with `cache rm"):
        CacheReader(path)


def test_a_cache_that_cannot_fit_the_disk_is_refused_before_its_first_row(tmp_path: Path, monkeypatch) -> None:
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: shutil_module._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(MedfmError, match=r"needs .* MiB but .* has 0.0 MiB free"):
        CacheWriter.open(tmp_path / "c.h5", META, make_plan())
    assert list(tmp_path.iterdir()) == []  # no partial file, no lock file
