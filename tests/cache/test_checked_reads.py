"""Every read of a cache's rows is checked against the CRC-32 stored beside each row: damaged bytes stop the reader in
one line that names the file, the split, the array and the row, and says what to do."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from cache.store import CacheReader, CacheWriter, DamagedCache, SourceFiles, partial_path, verify
from probe.cli import main as probe_main
from probe.data import FeatureSource
from tests.cache.damage import scribble
from tests.cache.plans import make_plan, rows_for, write_all
from tests.probe.caches import make_cache
from tests.tiny import META, run_main


def complete_cache(path: Path, n: int = 10) -> Path:
    writer = CacheWriter.open(path, META, make_plan(n=n))
    write_all(writer)
    return writer.finalize()


def one_line(err: BaseException | str) -> str:
    text = str(err)
    assert "\n" not in text.strip()
    return text


READS = {
    "features": lambda r, a: r.features("train", a),
    "read_rows": lambda r, a: r.read_rows("train", a, 0, 10),
    "iter_slices": lambda r, a: list(r.iter_slices("train", a)),
    "take_rows": lambda r, a: r.take_rows("train", a, np.array([1, 4, 7, 8]), np.empty((4, *r.dataset("train", a).shape[1:]),
                                                                                      r.dataset("train", a).dtype)),
    "dataset[:]": lambda r, a: r.dataset("train", a)[:],
    "dataset[5:9]": lambda r, a: r.dataset("train", a)[5:9],
    "dataset[7]": lambda r, a: r.dataset("train", a)[7],
    "dataset[-3, 0]": lambda r, a: r.dataset("train", a)[-3, 0],
    "dataset[rows]": lambda r, a: r.dataset("train", a)[[9, 7, 1]],
    "dataset[::2]": lambda r, a: r.dataset("train", a)[1::2],
    "asarray": lambda r, a: np.asarray(r.dataset("train", a)),
}


@pytest.mark.parametrize("array", ["pooled", "tokens"])
def test_a_flipped_byte_stops_every_read_of_its_row_in_one_line_naming_the_row(tmp_path: Path, array: str) -> None:
    path = complete_cache(tmp_path / "c.h5")
    scribble(path, "train", array, 7, size=1)
    for name, read in READS.items():
        with CacheReader(path) as reader, pytest.raises(DamagedCache) as caught:
            read(reader, array)
        message = one_line(caught.value)
        assert message.startswith(f"cache {path}: train/{array} row 7 differs from its checksum"), name
        assert f"`cache verify {path}`" in message and f"`cache rm {path}`" in message and "extract it again" in message
    with CacheReader(path) as reader:  # the other rows and arrays read, and read right
        np.testing.assert_array_equal(reader.read_rows("train", array, 0, 7), rows_for("train", 0, 7)[array])
        np.testing.assert_array_equal(reader.dataset("train", array)[8:], rows_for("train", 8, 10)[array])
        assert reader.dataset("train", array).shape[0] == len(reader.dataset("train", array)) == 10
        other = "tokens" if array == "pooled" else "pooled"
        np.testing.assert_array_equal(reader.features("train", other), rows_for("train", 0, 10)[other])
        np.testing.assert_array_equal(reader.features("val", array), rows_for("val", 0, 10)[array])
    assert f"train/{array}: 1 row(s) differ from their checksums (first: row 7)" in verify(path)


def test_checked_reads_return_what_numpy_indexing_returns(tmp_path: Path) -> None:
    path = complete_cache(tmp_path / "c.h5")
    keys = [np.s_[:], np.s_[2:5], np.s_[3], np.s_[-1], np.s_[..., 0], np.s_[2:5, 1], np.s_[[4, 1, 8]], np.s_[::3], np.s_[8:2:-2],
            np.s_[np.arange(10) % 2 == 0], np.s_[()], np.s_[7:3]]
    with CacheReader(path) as reader, h5py.File(path, "r") as f:
        for array in ("pooled", "tokens"):
            checked, raw = reader.dataset("train", array), f[f"train/{array}"]
            assert (checked.shape, checked.dtype, checked.chunks) == (raw.shape, raw.dtype, raw.chunks)
            for key in keys:
                np.testing.assert_array_equal(checked[key], raw[()][key], err_msg=str(key))  # NumPy's indexing (h5py's, and more)
        assert isinstance(reader.dataset("train", "ids"), h5py.Dataset)  # ids, labels, valid: h5py's own datasets


def test_damaged_ids_labels_or_validity_are_refused_when_read(tmp_path: Path) -> None:
    path = complete_cache(tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:
        f["train/labels"][0] = 2
        f["val/ids"][0] = "someone-else"
        f["test/valid"][3] = False
    for read, where in ((lambda r: r.labels("train"), "train/labels"), (lambda r: r.ids("val"), "val/ids"),
                        (lambda r: r.valid("test"), "test/valid"), (lambda r: r.features("test"), "test/valid")):
        with CacheReader(path) as reader, pytest.raises(DamagedCache, match=f"^cache .*: {where} differs from its checksum.*cache rm"):
            read(reader)


def streamed(reader: CacheReader, array: str) -> int:
    """A RAM budget just below the array's size: the probe streams it."""
    return sum(reader.nbytes(s, array) for s in reader.splits) - 1


def test_the_probe_reads_stop_on_a_damaged_row_in_ram_and_streamed(tmp_path: Path) -> None:
    path = make_cache(tmp_path / "c.h5")
    scribble(path, "train", "tokens", 100, size=64)
    with CacheReader(path) as reader, pytest.raises(DamagedCache, match=r"train/tokens row 100 differs"):
        FeatureSource(reader, "tokens", 16)  # RAM mode: the whole array, loaded once
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "tokens", 16, max_ram=streamed(reader, "tokens"))
        assert source.streamed
        with pytest.raises(DamagedCache, match=r"train/tokens row 100 differs"):
            for _ in source.train_batches((0, 1)):
                pass
        list(source.eval_batches("test"))  # the sound splits still read
    scribble(path, "test", "pooled", 3, size=4)
    with CacheReader(path) as reader:
        source = FeatureSource(reader, "pooled", 16, max_ram=streamed(reader, "pooled"))
        assert source.streamed
        with pytest.raises(DamagedCache, match=r"test/pooled row 3 differs"):
            list(source.eval_batches("test"))


def test_probe_run_on_a_damaged_cache_stops_with_one_line_and_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_cache(tmp_path / "c.h5", tokens=None)
    scribble(path, "train", "pooled", 5, size=8)
    code, out, err = run_main(probe_main, ["run", "--cache", str(path), "--epochs", "1", "--batch-size", "16"], monkeypatch)
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert " ".join(err.split()).startswith(f"error: cache {path}: train/pooled row 5 differs from its checksum")
    assert not list((tmp_path / "outputs").rglob("metrics.json"))


def test_a_row_is_checked_on_its_first_read_by_a_reader_and_again_by_the_next(tmp_path: Path) -> None:
    path = complete_cache(tmp_path / "c.h5")
    with CacheReader(path) as reader:
        reader.features("train", "tokens")
        scribble(path, "train", "tokens", 2, size=2)
        reader.features("train", "tokens")  # found sound by this reader already: copied at memory speed
    with CacheReader(path) as reader, pytest.raises(DamagedCache, match="train/tokens row 2"):
        reader.features("train", "tokens")


def test_a_resumed_cache_finalizes_and_reads_clean_and_unwritten_rows_are_not_checked(tmp_path: Path) -> None:
    path, plan = tmp_path / "c.h5", make_plan()
    writer = CacheWriter.open(path, META, plan)
    writer.write("train", 0, rows_for("train", 0, 4))
    writer.close()  # killed: rows 4.. of train and every other split are allocated, never written, never checksummed
    with h5py.File(partial_path(path), "r") as f:
        assert int(f["train"].attrs["rows"]) == 4 and not f["train/crc32/pooled"][4:].any()
    resumed = CacheWriter.open(path, META, plan)
    assert resumed.resumed and resumed.rows("train") == 4
    write_all(resumed)
    resumed.finalize()
    with CacheReader(path) as reader:
        for split in ("train", "val", "test"):
            for array in ("pooled", "tokens"):
                np.testing.assert_array_equal(reader.features(split, array), rows_for(split, 0, 10)[array])
    assert verify(path) == []
    # rows past a split's `rows` mark (never written, so no checksum) are read as they are, not checked
    with h5py.File(path, "r+") as f:
        f["train"].attrs["rows"] = 6
    scribble(path, "train", "pooled", 8, size=4)
    with CacheReader(path) as reader:
        reader.read_rows("train", "pooled", 0, 10)
    scribble(path, "train", "pooled", 5, size=4)
    with CacheReader(path) as reader, pytest.raises(DamagedCache, match="train/pooled row 5"):
        reader.read_rows("train", "pooled", 0, 10)


def test_recorded_source_files_round_trip_and_their_damage_is_found(tmp_path: Path) -> None:
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (10 + i))
    sources = SourceFiles.record([*map(str, files), files[0]], hashed=True)  # each file once
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, META, make_plan(), sources=sources)
    write_all(writer)
    writer.finalize()
    with CacheReader(path) as reader:
        assert reader.sources() == sources and len(sources.paths) == 3 and sources.changed() == []
    files[2].unlink()
    files[1].write_bytes(b"longer than before")
    assert sources.changed() == [(str(files[1]), "size 11 -> 18 bytes"), (str(files[2]), "missing")]
    with h5py.File(path, "r+") as f:
        f["sources/size"][1] = 99
    assert "sources/size differs from its checksum" in verify(path)
    with CacheReader(path) as reader, pytest.raises(DamagedCache, match=r"sources/size differs from its checksum.*cache rm"):
        reader.sources()
    complete_cache(tmp_path / "features.h5")
    with CacheReader(tmp_path / "features.h5") as reader:
        assert reader.sources() is None  # a feature cache records none
