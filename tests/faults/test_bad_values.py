"""Bad values and wrong inputs that escaped as tracebacks (N12, N13) or were taken silently (unclear 6, 7): one `error:`
line each, through the real command lines, before any model is built."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from extract.cli import main as extract_main
from probe.cli import main as probe_main
from tests.faults.broken import one_line
from tests.probe.caches import clean_cache, make_cache, view
from tests.tiny import run_main

DEMO = ["--dataset", "demo", "--opt", "per_class=8"]
RUN = ["run", "--backbone", "deit", "--weights", "random", "--image-size", "32", "--no-tokens"]


def test_training_on_a_test_only_cache_says_it_has_no_train_split_and_what_to_give(isolated_outputs, monkeypatch):
    """N12: a corrupted test view holds the test split alone; `probe run` on it was a KeyError from h5py."""
    corrupted = view(clean_cache(isolated_outputs), "gaussian_noise", 3, 0.5)
    for command in (["run"], ["sweep"], ["curve", "--fractions", "0.5"]):
        line = one_line(*run_main(probe_main, [*command, "--cache", str(corrupted)], monkeypatch)[::2], command[0])
        assert f"cache {corrupted} has no train split to train on (it holds test)" in line and f"probe eval RUN --cache {corrupted}" in line


def csv_with_nul(folder: Path) -> Path:
    """A CSV dataset one of whose paths holds a NUL byte (the images need not exist: it is refused before they are read)."""
    folder.mkdir()
    rows = [f"im{i}.png,{'ab'[i % 2]}" for i in range(12)]
    rows[2] = "im\x00x.png,a"
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return folder


Case = namedtuple("Case", "main args said")


def cases(tmp: Path) -> dict[str, Case]:
    """N13's nine values, as the attack typed them, and `probe curve --out` at a file."""
    afile = tmp / "passwd_copy"
    afile.write_text("root:x:0:0\n")
    cache = make_cache(tmp / "c.h5")
    return {
        "workers": Case(extract_main, ["images", *DEMO, "--resize", "37", "--workers", "-1"], "--workers must be 0 (decode in the main process) or more, got -1"),
        "images-out": Case(extract_main, ["images", *DEMO, "--out", str(afile)], f"--out {afile} is not a folder"),
        "report-out": Case(probe_main, ["report", "--out", str(afile)], f"--out {afile} is not a folder"),
        "curve-out": Case(probe_main, ["curve", "--cache", str(cache), "--out", str(afile)], f"--out {afile} is not a folder"),
        "seeds": Case(probe_main, ["run", "--cache", str(cache), "--epochs", "2", "--seeds", "99999999999999999999"],
                      "a head seed (--seed, --seeds) must be a whole number from 0 to 4294967295, got 99999999999999999999"),
        "data-seed": Case(probe_main, ["run", "--cache", str(cache), "--epochs", "2", "--data-seed", "-1"],
                          "--data-seed must be a whole number from 0 to 4294967295, got -1"),
        "compare-seed": Case(probe_main, ["compare", "1", "2", "--seed", "-1"], "--seed must be a whole number of 0 or more, got -1"),
        "corrupt": Case(extract_main, [*RUN, *DEMO, "--corrupt", "gaussian_noise:³"], "the severity must be a whole number from 0"),
        "root-file": Case(extract_main, [*RUN, "--dataset", "imagefolder", "--root", str(afile)], f"--root {afile} is a file, not a folder"),
        "nul": Case(extract_main, [*RUN, "--dataset", "csv", "--root", str(csv_with_nul(tmp / "csvx"))],
                    "sample 2 of the dataset ('im\\x00x.png') has a NUL byte in its name or path"),
    }


@pytest.mark.parametrize("name", ["workers", "images-out", "report-out", "curve-out", "seeds", "data-seed", "compare-seed", "corrupt", "root-file", "nul"])
def test_each_bad_value_of_the_attack_is_one_line(name, tmp_path, monkeypatch):
    case = cases(tmp_path)[name]
    assert case.said in one_line(*run_main(case.main, case.args, monkeypatch)[::2])


def test_augment_without_views_is_refused_not_ignored(monkeypatch):
    """Unclear 6: `--augment study` without `--views` stored the eval view alone, its meta saying `augment: study`."""
    line = one_line(*run_main(extract_main, [*RUN, *DEMO, "--augment", "study"], monkeypatch)[::2])
    assert "--augment study draws augmented train views: give --views K too" in line


def test_a_full_disk_under_an_image_cache_advises_a_smaller_resize_not_no_tokens(isolated_outputs, monkeypatch):
    """Unclear 7: `extract images` advised `--no-tokens`, an option of `extract run`."""
    monkeypatch.setattr("cache.store.shutil.disk_usage", lambda _: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1024))
    line = one_line(*run_main(extract_main, ["images", *DEMO, "--resize", "16", "--workers", "0"], monkeypatch)[::2])
    assert "MiB free; free space, store smaller images (a smaller --resize)" in line and "--no-tokens" not in line
