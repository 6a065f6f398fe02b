"""The image cache against its files: a damaged stored image stops the extraction that reads it, and a cache whose
source files changed since it was built is refused (by extraction, finetune and `extract images`) until rebuilt."""

from __future__ import annotations

import io
import json
import os
import shlex
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from bench.images import photo
from cache.store import CacheReader, CacheWriter, verify
from common.errors import MedfmError
from extract.cli import main
from extract.datasets import get_dataset
from extract.image_cache import ImageCacheConfig, build_image_cache, find_image_cache
from extract.runner import extract
from finetune.data import find_pixels
from tests.cache.damage import scribble
from tests.extract.image_caches import RESIZE, features_config, photo_folder, spec, tensors
from tests.tiny import QUIET, run_main


def build(root: Path, folder: Path | None = None, **kw) -> Path:
    return build_image_cache(ImageCacheConfig("imagefolder", root, folder or Path(os.environ["MEDFM_OUTPUT"]) / "images",
                                              resize=RESIZE, workers=0, **kw), QUIET).path


def rewrite(path: Path, seed: int = 1, same_size: bool = False) -> None:
    """New pixels under the same name; the modification time moved on by a second (coarse file system clocks too)."""
    before = path.stat()
    if same_size:
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF  # inside the last chunk's data: the size stays
        path.write_bytes(bytes(data))
    else:
        photo(np.random.default_rng(seed), (70, 50), fundus=False).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def test_a_scribbled_image_cache_row_stops_the_next_extraction_in_one_line(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    path = build(root)
    with CacheReader(path) as reader:
        row = 1
        image_id = reader.row_ids("test")[row]
    scribble(path, "test", "pixels", row, size=4096)  # 4 KiB over one stored 37 x 37 RGB image (4107 bytes)
    with pytest.raises(MedfmError) as caught:
        extract(features_config(tmp_path / "a", root, views=0, augment="none"), QUIET)
    message = str(caught.value)
    assert "\n" not in message and image_id in message
    assert f"cache {path}: test/pixels row {row} differs from its checksum" in message
    assert f"`cache verify {path}`" in message and f"`cache rm {path}`" in message and "extract images" in message
    assert not list((tmp_path / "a").rglob("*.h5"))  # no feature cache under a clean one's name
    with pytest.raises(MedfmError) as caught:  # damaged stored pixels are no unreadable image: --skip-bad stops too
        extract(features_config(tmp_path / "a", root, views=0, augment="none", skip_bad=True), QUIET)
    assert f"test/pixels row {row} differs from its checksum" in str(caught.value) and "--skip-bad" not in str(caught.value)
    assert not list((tmp_path / "a").rglob("*.h5"))
    assert f"test/pixels: 1 row(s) differ from their checksums (first: row {row})" in verify(path)
    # rebuilt, it reads again, and the features are the files'
    build(root, rebuild=True)
    cached = extract(features_config(tmp_path / "a", root, views=0, augment="none"), QUIET)
    files = extract(features_config(tmp_path / "b", root, views=0, augment="none", image_cache="off"), QUIET)
    with CacheReader(cached.path) as a, CacheReader(files.path) as b:
        assert np.array_equal(a.features("test"), b.features("test"))


def test_rewritten_source_images_are_refused_by_every_reader_until_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = photo_folder(tmp_path / "data")
    folder = tmp_path / "images"
    path = build(root, folder)
    source = get_dataset("imagefolder", root)
    changed = root / "class1" / "03.png"
    rewrite(changed)
    stale = rf"image cache {path} is stale: {changed} changed since it was built \(size \d+ -> \d+ bytes\); rebuild it with `extract images"
    with pytest.raises(MedfmError, match=stale) as caught:
        find_image_cache(source, root, spec(), str(folder))  # extraction's way in
    command = str(caught.value).split("`")[-2]
    assert command.endswith("--rebuild") and f"--out {folder}" in command and f"--resize {RESIZE}" in command
    with pytest.raises(MedfmError, match=stale):
        find_pixels(source, root, spec(), str(folder))  # finetune's
    with pytest.raises(MedfmError, match=stale):
        extract(features_config(tmp_path / "a", root, views=0, augment="none", image_cache=str(folder)), QUIET)
    with pytest.raises(MedfmError, match=stale):
        build(root, folder)  # `extract images` without --rebuild: not reused
    (said,) = verify(path)  # `cache verify` says so too
    assert said.startswith(f"sources: {changed} changed since the cache was built (size") and "--rebuild" in said
    code, out, err = run_main(main, shlex.split(command)[1:], monkeypatch)  # the command the message gives
    assert code == 0 and out.startswith("wrote"), err
    pixels = find_image_cache(source, root, spec(), str(folder))
    assert pixels is not None and pixels.path == path and verify(path) == []
    assert all(torch.equal(a, b) for a, b in zip(tensors(source, spec()), tensors(source, spec(), pixels), strict=True))
    # two changed, one of the same size (its time moved): the first is named, the other counted
    rewrite(root / "class0" / "00.png", same_size=True)
    rewrite(root / "class0" / "02.png")
    with pytest.raises(MedfmError, match=r"stale: .*0[02]\.png changed since it was built \((modified|size).*\) and 1 more file\(s\) did"):
        find_image_cache(source, root, spec(), str(folder))


def test_a_re_split_cache_is_rebuilt_by_the_command_its_extraction_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image cache built for a saved split (`--manifest`): the stale message of the extraction that reads it names the
    manifest, so its command rebuilds that cache and not the dataset's own split's."""
    root = photo_folder(tmp_path / "data")
    folder = tmp_path / "images"
    ids = get_dataset("imagefolder", root).manifest()
    manifest = tmp_path / "resplit.splits.json"
    manifest.write_text(json.dumps({"train": ids["train"] + ids["val"], "test": ids["test"]}))  # no val split
    path = build(root, folder, manifest=manifest)
    rewrite(root / "class1" / "03.png")
    with pytest.raises(MedfmError, match=rf"image cache {path} is stale") as caught:
        extract(features_config(tmp_path / "a", root, views=0, augment="none", image_cache=str(folder), manifest=manifest), QUIET)
    command = str(caught.value).split("`")[-2]
    assert f"--manifest {manifest}" in command
    code, out, err = run_main(main, shlex.split(command)[1:], monkeypatch)
    assert code == 0 and out.startswith("wrote") and str(path) in "".join(out.split()), err  # this cache, rebuilt
    assert verify(path) == []


def test_hashed_sources_pass_a_touched_file_and_refuse_new_bytes_of_the_same_size(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    folder, stat_folder = tmp_path / "images", tmp_path / "stat"
    build(root, folder, hash_sources=True)
    build(root, stat_folder)
    source = get_dataset("imagefolder", root)
    touched = root / "class0" / "04.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 5_000_000_000))  # a copy, a restore: same bytes
    assert find_image_cache(source, root, spec(), str(folder)) is not None
    with pytest.raises(MedfmError, match=r"04\.png changed since it was built \(modified"):
        find_image_cache(source, root, spec(), str(stat_folder))  # size and time alone: refused
    rewrite(touched, same_size=True)
    with pytest.raises(MedfmError, match=r"04\.png changed since it was built \(content differs from its recorded sha256\)"):
        find_image_cache(source, root, spec(), str(folder))


def test_an_image_cache_from_before_the_record_reads_unchecked_and_says_so_once(tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "data")
    folder = tmp_path / "images"
    path = build(root, folder)
    with h5py.File(path, "r+") as f:
        del f["sources"]  # as medfm wrote it before
    assert verify(path) == []
    rewrite(root / "class1" / "05.png")  # not seen: nothing to compare with
    said = io.StringIO()
    console = Console(file=said, width=400)
    source = get_dataset("imagefolder", root)
    for _ in range(2):
        assert find_image_cache(source, root, spec(), str(folder), console=console) is not None
    assert said.getvalue().count("was built before medfm recorded its source files") == 1
    assert "--rebuild" in said.getvalue()
    build(root, folder, rebuild=True)
    with pytest.raises(MedfmError, match=r"05\.png changed"):
        rewrite(root / "class1" / "05.png", seed=2)
        find_image_cache(source, root, spec(), str(folder))


def test_a_killed_build_resumes_and_one_whose_files_changed_meanwhile_starts_again(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = photo_folder(tmp_path / "data", count=40, size=(40, 30))
    write = CacheWriter.write

    def kill_after_the_first_batch() -> None:
        calls = []

        def dies(self, split, start, features, valid=None):
            calls.append(split)
            if len(calls) == 2:
                raise KeyboardInterrupt
            write(self, split, start, features, valid)

        monkeypatch.setattr(CacheWriter, "write", dies)
        with pytest.raises(KeyboardInterrupt):
            build(root, tmp_path / "images")
        monkeypatch.setattr(CacheWriter, "write", write)

    kill_after_the_first_batch()
    resumed = build_image_cache(ImageCacheConfig("imagefolder", root, tmp_path / "images", resize=RESIZE, workers=0), QUIET)
    assert resumed.decoded == 40 - 16 and verify(resumed.path) == []  # the first batch was kept
    resumed.path.unlink()
    kill_after_the_first_batch()
    rewrite(root / "class0" / "00.png")
    said = io.StringIO()
    again = build_image_cache(ImageCacheConfig("imagefolder", root, tmp_path / "images", resize=RESIZE, workers=0),
                              Console(file=said, width=400))
    assert again.decoded == 40 and "its record of the source files differs" in said.getvalue()
    assert find_image_cache(get_dataset("imagefolder", root), root, spec(), str(tmp_path / "images")) is not None


def test_a_dataset_without_image_files_records_none_and_reads_quietly(tmp_path: Path) -> None:
    path = build_image_cache(ImageCacheConfig("demo", out=tmp_path / "images", resize=RESIZE, dataset_options={"per_class": 5},
                                              workers=0), QUIET).path
    with CacheReader(path) as reader:
        sources = reader.sources()
        assert sources is not None and sources.paths == ()
    said = io.StringIO()
    source = get_dataset("demo", None, per_class=5)
    assert find_image_cache(source, None, spec(), str(tmp_path / "images"), console=Console(file=said)) is not None
    assert said.getvalue() == ""
