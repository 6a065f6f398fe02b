"""The extraction loop: reuse by fingerprint, resume after SIGKILL, never a silent overwrite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from cache.store import CacheReader, partial_path
from common.errors import MedfmError
from extract.runner import extract
from tests.conftest import REPO
from tests.extract import killable  # noqa: F401  (registers killable-demo)
from tests.extract.extractions import config
from tests.tiny import QUIET


def read_all(path: Path) -> dict[str, np.ndarray]:
    with CacheReader(path) as r:
        return {f"{s}/{k}": r.features(s, k) for s in r.groups for k in r.feature_names(s)} | {
            f"{s}/ids": r.ids(s) for s in r.groups}


def test_extraction_writes_every_split_with_pooled_and_tokens(tmp_path: Path) -> None:
    result = extract(config(tmp_path), QUIET)
    with CacheReader(result.path) as r:
        assert r.splits == ["train", "val", "test"]
        assert r.features("train").shape == (24, 32)
        assert r.features("val", "tokens").shape == (8, 4, 32)
        assert r.meta.backbone.random_weights is True
        assert r.task.class_names == ("disc", "ring", "bars", "checker")
    assert result.path.with_suffix(".splits.json").exists()


def test_second_run_reuses_the_cache_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = extract(config(tmp_path), QUIET)
    console = Console(file=sys.stdout, width=200)
    second = extract(config(tmp_path), console)
    assert second.reused and second.path == first.path
    assert "reusing cache" in capsys.readouterr().out


def test_other_settings_get_another_file_never_an_overwrite(tmp_path: Path) -> None:
    a = extract(config(tmp_path), QUIET)
    before = read_all(a.path)
    b = extract(config(tmp_path, token_dtype="float32"), QUIET)
    c = extract(config(tmp_path, dataset_options={"per_class": 10, "split_seed": 1}), QUIET)
    assert len({a.path, b.path, c.path}) == 3
    after = read_all(a.path)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_extra_layers_are_stored_from_one_pass(tmp_path: Path) -> None:
    result = extract(config(tmp_path, layers=[0]), QUIET)
    with CacheReader(result.path) as r:
        assert set(r.feature_names("train")) == {"pooled", "tokens", "pooled@0", "tokens@0"}
        assert not np.allclose(r.features("train", "pooled@0"), r.features("train", "pooled"))


def test_bad_layer_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="layer 5 is out of range for a backbone of 2 blocks"):
        extract(config(tmp_path, layers=[5]), QUIET)


KILL_SCRIPT = """
import sys
from pathlib import Path
from rich.console import Console
from tests.extract import killable
from tests.extract.extractions import config
from extract.runner import extract
extract(config(Path(sys.argv[1]), dataset="killable-demo", batch_size=4), Console(stderr=True))
"""


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Kill the extraction with SIGKILL while it waits on image 20 of 40, rerun it, compare with a clean run."""
    killed_out, clean_out, marker = tmp_path / "killed", tmp_path / "clean", tmp_path / "paused"
    env = {**os.environ, killable.PAUSE_ENV: f"20:{marker}", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(killed_out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "extraction never reached the pause point"
        time.sleep(0.1)
    time.sleep(0.5)  # let the writer thread flush what it has
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partials = list(killed_out.rglob("*.h5.partial"))
    assert len(partials) == 1 and not list(killed_out.rglob("*.h5"))
    with h5py.File(partials[0], "r") as killed:
        held = {split: int(killed[split].attrs["rows"]) for split in ("train", "val", "test")}
    assert sum(held.values()) > 0, held  # the killed run had flushed its first batches

    resumed = extract(config(killed_out, dataset="killable-demo", batch_size=4), QUIET)
    clean = extract(config(clean_out, dataset="killable-demo", batch_size=4), QUIET)
    assert not resumed.reused and not partial_path(resumed.path).exists()
    assert resumed.extracted == clean.extracted - sum(held.values())  # it ran only the rows the killed run had not written
    got, want = read_all(resumed.path), read_all(clean.path)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
