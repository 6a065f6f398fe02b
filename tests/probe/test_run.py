"""`probe run` as a function: cache lookup, skip-if-done through the ledger, run folder and ledger row."""

from __future__ import annotations

import json

import pytest

from cache.layout import find_cache, open_cache
from common.errors import MedfmError
from ledger.predictions import load_predictions
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.data import feature_name
from probe.run import run_probe
from scoring.metrics import compute_metrics
from tests.probe.caches import make_cache
from tests.tiny import MULTICLASS

FAST = TrainConfig(epochs=2, batch_size=32, solver="adamw")


def test_run_writes_folder_and_ledger_row_then_skips_the_same_config(isolated_outputs):
    path = make_cache(isolated_outputs / "features" / "deit" / "demo-0123456789ab.h5")
    assert find_cache("deit", "demo") == path
    with open_cache(path, "deit", "demo") as reader:
        first = run_probe(reader, FAST)
        again = run_probe(reader, FAST)
        forced = run_probe(reader, FAST, force=True)
        other_seed = run_probe(reader, TrainConfig(epochs=2, batch_size=32, seed=1, solver="adamw"))
    assert not first.skipped and again.skipped and not forced.skipped and not other_seed.skipped
    assert again.record.id == first.record.id
    rows = Ledger().rows()
    assert len(rows) == 3
    row = rows[0]
    assert (row.stage, row.scenario, row.backbone, row.dataset, row.head) == ("probe", "frozen-linear", "deit", "demo", "linear")
    assert row.backbone_random and not row.head_random and row.primary_metric == "accuracy" and row.test_primary == row.test_metrics["accuracy"]
    run_dir = isolated_outputs / "runs" / "probe"
    folder = next(p for p in run_dir.iterdir() if str(p) == row.run_dir)
    names = {p.name for p in folder.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}  # TensorBoard's scalars (tests/probe/test_tensorboard.py)
    assert names - events == {"config.json", "history.jsonl", "history.csv", "head.pt", "metrics.json", "predictions.npz",
                              "reliability.png"} and len(events) == 1
    stored = load_predictions(folder, "test")  # what intervals and paired tests are computed from, without retraining
    with open_cache(path, "deit", "demo") as reader:
        assert stored.ids.tolist() == reader.ids("test").tolist() and stored.labels.tolist() == reader.labels("test").tolist()
    assert compute_metrics(MULTICLASS, stored.labels, stored.logits)["accuracy"] == pytest.approx(row.test_primary)
    assert json.loads((folder / "config.json").read_text())["config_key"] == row.config_key
    assert len((folder / "history.jsonl").read_text().splitlines()) == 2


def test_missing_several_and_partial_caches_are_clear_errors(isolated_outputs):
    folder = isolated_outputs / "features" / "deit"
    with pytest.raises(MedfmError, match="extract run --backbone deit --dataset demo"):
        find_cache("deit", "demo")
    folder.mkdir(parents=True)
    (folder / "demo-0123456789ab.h5.partial").write_bytes(b"")
    with pytest.raises(MedfmError, match="incomplete"):
        find_cache("deit", "demo")
    make_cache(folder / "demo-aaaaaaaaaaaa.h5", settings={"norm": {"kind": "model"}, "layers": [11]})
    make_cache(folder / "demo-bbbbbbbbbbbb.h5", settings={"norm": {"kind": "study"}, "layers": [11]})
    make_cache(folder / "demo-extra-cccccccccccc.h5")  # another dataset whose name starts with "demo-"
    with pytest.raises(MedfmError, match="--cache") as err:
        find_cache("deit", "demo")
    message = str(err.value)
    assert "demo-extra" not in message and "layers" not in message  # only what tells the two apart
    assert "demo-aaaaaaaaaaaa.h5 (norm.kind=model)" in message and "demo-bbbbbbbbbbbb.h5 (norm.kind=study)" in message


def test_layer_and_head_pick_the_cache_array_or_say_what_is_missing(tmp_path):
    path = make_cache(tmp_path / "c.h5", extra_layers=(4,))
    with open_cache(path, None, None) as reader:
        assert feature_name(reader, "pooled", None) == "pooled"
        assert feature_name(reader, "pooled", 11) == "pooled"
        assert feature_name(reader, "tokens", 4) == "tokens@4"
        assert feature_name(reader, "tokens", -8) == "tokens@4"  # -8 of 12 blocks: block 4
        with pytest.raises(MedfmError, match="not layer 7"):
            feature_name(reader, "pooled", 7)
    no_tokens = make_cache(tmp_path / "p.h5", tokens=None)
    with open_cache(no_tokens, None, None) as reader, pytest.raises(MedfmError, match="--tokens"):
        feature_name(reader, "tokens", None)


def test_cache_of_another_backbone_is_refused(tmp_path):
    path = make_cache(tmp_path / "c.h5", backbone="dinov2")
    with pytest.raises(MedfmError, match="dinov2"):
        open_cache(path, "deit", None)


def test_bad_training_values_are_user_errors(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    with open_cache(path, None, None) as reader:
        for config, flag in ((TrainConfig(epochs=0), "--epochs"), (TrainConfig(lr=-1), "--lr"), (TrainConfig(head="mlp"), "unknown head")):
            with pytest.raises(MedfmError, match=flag):
                run_probe(reader, config)


def test_a_run_saved_in_the_same_second_under_the_same_key_gets_its_own_folder(tmp_path) -> None:
    """A `--force` retrain may finish within the second of the run it retrains: the earlier run folder is kept."""
    from ledger.runs import new_run_dir

    first = new_run_dir(tmp_path / "runs", "20261130-101500-deit-demo-linear-1a2b3c4d")
    (first / "head.pt").write_bytes(b"first")
    second = new_run_dir(tmp_path / "runs", "20261130-101500-deit-demo-linear-1a2b3c4d")
    assert second != first and second.name.endswith("-2") and (first / "head.pt").read_bytes() == b"first"
