"""Files of a run, or given to a command, that are not what they should be: each is read by its one validating loader and
is one `error:` line naming the file and what to do (N11, N14, unclear messages 2-4 of the attack)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.cli import main as extract_main
from ledger.store import Ledger
from probe.cli import main
from tests.faults.broken import one_line, trained
from tests.probe.caches import make_cache
from tests.tiny import run_main


def run_dir(run: int) -> Path:
    return Path(Ledger().rows(id=run)[0].run_dir or "")


@pytest.mark.parametrize(("content", "said"), [
    ({"weight": torch.zeros(4, 16), "bias": torch.zeros(4)}, "holds the tensors of another model than run 1's linear head (it lacks"),
    (b"\x00\x01 not a checkpoint", "refusing to load"),
], ids=["other-tensors", "random-bytes"])
def test_a_head_that_is_not_the_runs_is_one_line_naming_it(content, said, isolated_outputs, monkeypatch):
    """N11: a safe file of other tensors made load_state_dict raise a RuntimeError."""
    trained(isolated_outputs, runs=1)
    head = run_dir(1) / "head.pt"
    head.write_bytes(content) if isinstance(content, bytes) else torch.save(content, head)
    line = one_line(*run_main(main, ["eval", "1"], monkeypatch)[::2])
    assert str(head) in line and said in line and "retrain the run with --force" in line


def object_array(path: Path) -> None:
    np.savez(path, test_ids=np.array([object()], dtype=object), test_labels=np.zeros(1), test_logits=np.zeros((1, 2)))


@pytest.mark.parametrize(("write", "said"), [
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2048)), "pickled data, which is never loaded"),
    (lambda p: p.write_bytes(pickle.dumps({"test_ids": [1]})), "pickled data, which is never loaded"),
    (object_array, "pickled data, which is never loaded"),
    (lambda p: np.savez(p, test_ids=np.zeros(2), test_labels=np.zeros(2), test_logits=np.zeros((2, 3))), "arrays of the wrong kinds"),
], ids=["random-bytes", "pickle", "object-array", "numbers-as-ids"])
def test_stored_predictions_that_are_not_a_runs_are_one_line_naming_the_file(write, said, isolated_outputs, monkeypatch):
    trained(isolated_outputs)
    path = run_dir(2) / "predictions.npz"
    write(path)
    line = one_line(*run_main(main, ["compare", "1", "2"], monkeypatch)[::2])
    assert f"cannot read {path} ({said}" in line and "retrain the run with --force" in line


def test_a_garbage_config_json_is_named_as_damaged_not_as_a_moved_folder(isolated_outputs, monkeypatch):
    """Unclear 4: "the run folder was moved or removed", when the folder was there."""
    trained(isolated_outputs, runs=1)
    config = run_dir(1) / "config.json"
    config.write_text('{"state": "done", garb')
    line = one_line(*run_main(main, ["eval", "1"], monkeypatch)[::2])
    assert f"run 1: cannot read its {config} (Expecting" in line and "moved or removed" not in line


def test_a_removed_run_folder_is_said_as_removed_not_as_a_run_without_predictions(isolated_outputs, monkeypatch):
    """Unclear 2, 3: `probe report --ci` said the run kept no predictions and was older than medfm 0.2."""
    trained(isolated_outputs, runs=1)
    folder = run_dir(1)
    shutil.rmtree(folder)
    for command in (["report", "--ci", "95", "--boot", "50"], ["eval", "1"]):
        line = one_line(*run_main(main, command, monkeypatch)[::2], command[0])
        assert f"{folder} is gone (moved or removed)" in line and "before 0.2" not in line


def test_binary_prompts_are_one_line(tmp_path, monkeypatch):
    """N14: a UnicodeDecodeError traceback; a text file that is not JSON was already one line."""
    cache = make_cache(tmp_path / "openclip.h5", backbone="openclip")
    prompts = tmp_path / "evil_manifest.json"
    for content, said in ((bytes(range(256)), "is not a text file"), (b"templates: none", "is not JSON")):
        prompts.write_bytes(content)
        line = one_line(*run_main(extract_main, ["zeroshot", "--cache", str(cache), "--prompts", str(prompts)], monkeypatch)[::2])
        assert f"--prompts {prompts} {said}" in line
