"""`probe predict`: a finished run on the image files of its own test split gives back its stored test predictions (the
backbone, input pipeline and head rebuilt from what the run and its cache recorded); each bad input is one line."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from cache.schema import Task
from common.errors import MedfmError
from extract.backbones import REGISTRY as BACKBONES
from extract.backbones import get_spec
from finetune.train import finetune
from ledger.predictions import load_predictions
from ledger.store import Ledger
from predict.predict import predict, table
from probe.cli import main
from tests.conftest import REPO
from tests.extract.extractions import error_line
from tests.ledgers import train
from tests.predict.images import CLASSES, extract_folder, write_folder
from tests.probe.caches import SETTINGS, make_cache
from tests.tiny import TINY_VIT_1, run_main, tiny_finetune

DEIT = {"head": "deit", "feature": "tokens", "head_depth": 1, "head_preset": "deit-t", "head_weights": "random", "epochs": 2}


def assert_reproduces(found: pd.DataFrame, run_dir: str, root: Path) -> None:
    """Every test image's class probabilities equal the softmax of the logits the run stored for it."""
    stored = load_predictions(run_dir, "test")
    probs = dict(zip(stored.ids, softmax(stored.logits.astype(np.float64), axis=1), strict=True))
    ids = [Path(p).relative_to(root).as_posix() for p in found["path"]]
    assert sorted(ids) == sorted(stored.ids)
    ours = found[[f"p_{name}" for name in CLASSES]].to_numpy()
    np.testing.assert_allclose(ours, np.stack([probs[i] for i in ids]), atol=1e-6)
    assert list(found["prediction"]) == [list(CLASSES)[int(probs[i].argmax())] for i in ids]


@pytest.mark.slow  # a subprocess: the command line as a user runs it
def test_probe_predict_on_the_test_images_reproduces_the_runs_stored_test_predictions(tmp_path, isolated_outputs):
    root = write_folder(tmp_path / "scans")
    run_id = train(extract_folder(root, isolated_outputs / "features"))
    (run,) = Ledger().rows(id=run_id)
    out = tmp_path / "predicted.csv"
    proc = subprocess.run([sys.executable, "-m", "probe", "predict", run.run_dir, "--images", str(root / "test"), "--out", str(out),
                           "--device", "cpu"], capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 9 predictions of run {run_id}" in " ".join(proc.stdout.split())
    found = pd.read_csv(out)
    assert list(found.columns) == ["id", "path", "prediction", *(f"p_{name}" for name in CLASSES)]
    assert_reproduces(found, run.run_dir, root)


@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_a_deit_head_on_stored_tokens_listed_in_a_csv_reproduces_its_run(tmp_path, isolated_outputs, monkeypatch, token_dtype):
    """Tokens stored as float16 or quantized to int8 (`--token-dtype int8`): predict rebuilds them as the cache holds them."""
    root = write_folder(tmp_path / "scans")
    run_id = train(extract_folder(root, isolated_outputs / "features", token_dtype=token_dtype), **DEIT)
    (run,) = Ledger().rows(id=run_id)
    listing = root / "test.csv"
    pd.DataFrame({"path": load_predictions(run.run_dir, "test").ids}).to_csv(listing, index=False)
    code, _, err = run_main(main, ["predict", str(run_id), "--images", str(listing), "--device", "cpu"], monkeypatch)
    assert code == 0, err
    (written,) = (isolated_outputs / "predictions").iterdir()
    found = pd.read_csv(written)
    assert list(found["id"]) == list(load_predictions(run.run_dir, "test").ids)  # ids as the CSV wrote them
    assert_reproduces(found, run.run_dir, root)


def test_a_finetune_run_predicts_from_its_own_weights(tmp_path, isolated_outputs):
    root = write_folder(tmp_path / "scans")
    result = finetune(tiny_finetune(isolated_outputs / "runs", dataset="imagefolder", root=root, dataset_options={}, epochs=1))
    model, found = predict(str(result.ledger_id), root / "test", device="cpu")
    assert model.record.stage == "finetune"
    assert_reproduces(found, str(result.run_dir), root)
    with pytest.raises(MedfmError, match="its backbone's weights are its own"):
        predict(str(result.ledger_id), root / "test", weights="random")


def test_every_bad_input_is_one_line(tmp_path, isolated_outputs, monkeypatch):
    root = write_folder(tmp_path / "scans")
    (tmp_path / "empty").mkdir()
    monkeypatch.setitem(BACKBONES.entries, "tiny-deit", dataclasses.replace(get_spec("deit"), name="tiny-deit",
                                                                             build=functools.partial(get_spec("deit").build, **TINY_VIT_1)))
    tokens_run = train(extract_folder(root, isolated_outputs / "features", backbone="tiny-deit", overrides={}), **DEIT)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_bytes(b"not a png")
    code, _, err = run_main(main, ["predict", str(tokens_run), "--images", str(broken), "--device", "cpu"], monkeypatch)
    assert f"cannot read image {broken / 'scan.png'}" in error_line(code, err)
    monkeypatch.delitem(BACKBONES.entries, "tiny-deit")  # registered where it was extracted, not here
    cases = [
        (["404", "--images", str(root / "test")], "no run 404 in the ledger"),
        ([str(tokens_run), "--images", str(tmp_path / "nowhere")], "--images"),
        ([str(tokens_run), "--images", str(tmp_path / "empty")], "no images ("),
        ([str(tokens_run), "--images", str(root / "test")], f"run {tokens_run} (tokens of tiny-deit): its backbone is not available here"),
    ]
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the weights the features came from")
    weighted = {("pretrained", None): "official weights for 'deit' not found", ("file", None): "pass it with --weights PATH",
                ("file", str(other)): f"with weights of sha256 {'ab' * 6} (deit_base.pth), not other.pth; pass that file",
                ("random", str(other)): "was extracted with random weights, not other.pth; leave out --weights"}
    for (kind, weights), said in weighted.items():
        folder = isolated_outputs / "features" / f"{kind}-{weights is None}"
        folder.mkdir(parents=True)
        identity = {"kind": "random"} if kind == "random" else {"kind": kind, "file": "deit_base.pth", "sha256": "ab" * 32}
        cache = make_cache(folder / "demo-0123456789ab.h5", settings={**SETTINGS, "weights": identity}, tokens=None)
        cases.append(([str(train(cache)), "--images", str(root / "test"), *(["--weights", weights] if weights else [])], said))
    for args, said in cases:
        code, _, err = run_main(main, ["predict", *args, "--device", "cpu"], monkeypatch)
        assert said in error_line(code, err), args


def test_a_multilabel_row_names_every_label_at_one_half_or_more():
    task = Task("multilabel", ("effusion", "edema", "mass"), "mean_roc_auc")
    found = table(task, ["a", "b"], ["a.png", "b.png"], np.array([[2.0, 0.0, -2.0], [-3.0, -1.0, -4.0]]))
    assert list(found["prediction"].fillna("")) == ["effusion|edema", ""]
    np.testing.assert_allclose(found["p_edema"], [0.5, 1 / (1 + np.e)])
