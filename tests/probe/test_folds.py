"""`probe run --folds K`: K stratified (grouped) folds over a cache's train and test rows, one run per fold, and a
report cell that is their mean with an interval over the out-of-fold predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from common.errors import MedfmError
from ledger.store import Ledger
from probe.cli import main
from probe.data import FeatureSource
from probe.folds import fold_rows
from tests.probe.caches import make_cache
from tests.tiny import MULTICLASS, run_main


def grouped_cache(path: Path, order_seed: int = 0) -> Path:
    """Separable 4-class features with a patient column (3 images per patient), rows stored in a seeded order."""
    rng = np.random.default_rng(0)
    rows = {"train": 60, "val": 24, "test": 36}
    writer_plan, arrays = {}, {}
    for split, n in rows.items():
        ids = [f"{split}-{i:03d}" for i in range(n)]
        patients = [f"p-{split}-{i // 3}" for i in range(n)]
        labels = np.array([(i // 3) % 4 for i in range(n)])  # a patient's images share a class
        pooled = (rng.normal(size=(n, 8)) + 3 * np.eye(8)[labels]).astype(np.float32)
        order = np.random.default_rng(order_seed).permutation(n) if order_seed else np.arange(n)
        writer_plan[split] = SplitPlan([ids[i] for i in order], labels[order], {"pooled": FeatureSpec((8,), "float32")},
                                       metadata={"patient_id": [patients[i] for i in order]})
        arrays[split] = {"pooled": pooled[order]}
    meta = CacheMeta(BackboneInfo("deit", random_weights=True), DatasetInfo("demo"), MULTICLASS, layers=(11,), num_layers=12)
    writer = CacheWriter.open(path, meta, writer_plan)
    for split, data in arrays.items():
        writer.write(split, 0, data)
    return writer.finalize()


def test_the_folds_share_out_the_train_and_test_rows_once_stratified_and_by_patient(tmp_path):
    path = grouped_cache(tmp_path / "c.h5")
    with CacheReader(path) as reader:
        pooled = set(reader.ids("train")) | set(reader.ids("test"))
        patient = {i: p for s in ("train", "test") for i, p in zip(reader.ids(s), reader.metadata(s)["patient_id"], strict=False)}
        label = {i: y for s in ("train", "test") for i, y in zip(reader.ids(s), reader.labels(s), strict=False)}
        folds = [fold_rows(reader, 4, k, "patient_id") for k in range(4)]
    tested = [set(f.ids["test"]) for f in folds]
    assert set().union(*tested) == pooled and sum(map(len, tested)) == len(pooled)  # every row tested exactly once
    for fold, test in zip(folds, tested, strict=False):
        train = set(fold.ids["train"])
        assert train | test == pooled and not train & test
        assert not {patient[i] for i in train} & {patient[i] for i in test}  # no patient on both sides
        assert {label[i] for i in test} == {0, 1, 2, 3}  # every class in every test fold


def test_the_folds_depend_on_the_ids_not_on_the_row_order_of_the_file(tmp_path):
    with CacheReader(grouped_cache(tmp_path / "a.h5")) as a, CacheReader(grouped_cache(tmp_path / "b.h5", order_seed=7)) as b:
        for k in range(3):
            assert set(fold_rows(a, 3, k).ids["test"]) == set(fold_rows(b, 3, k).ids["test"])


def test_a_fold_source_serves_the_fold_rows_with_their_own_features_labels_and_ids(tmp_path):
    with CacheReader(grouped_cache(tmp_path / "c.h5", order_seed=3)) as reader:
        truth = {i: (x, y) for s in ("train", "test") for i, x, y in zip(reader.ids(s), reader.features(s), reader.labels(s), strict=False)}
        fold = fold_rows(reader, 3, 1)
        source = FeatureSource(reader, "pooled", 8, fold=fold)
        for split in ("train", "test"):
            features = np.concatenate([b.features for b in source.eval_batches(split)])
            assert list(source.ids(split)) == list(fold.ids[split])
            assert np.array_equal(features, np.stack([truth[i][0] for i in source.ids(split)]))
            assert np.array_equal(source.labels(split), [truth[i][1] for i in source.ids(split)])
        assert len(source.labels("val")) == 24  # validation untouched


def test_folds_fewer_rows_of_a_class_than_folds_is_one_line(tmp_path):
    with CacheReader(make_cache(tmp_path / "c.h5", rows={"train": 6, "val": 4, "test": 4}, tokens=None)) as reader:
        with pytest.raises(MedfmError, match="fewer than the folds; lower --folds"):
            fold_rows(reader, 5, 0)


def test_probe_run_folds_records_one_run_per_fold_and_the_report_averages_them(tmp_path, isolated_outputs, monkeypatch):
    path = grouped_cache(tmp_path / "c.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path), "--folds", "3"], monkeypatch)
    said = " ".join((out + err).split())
    assert code == 0, err
    assert "grouped by 'patient_id'" in said and "mean over 3 folds" in said
    rows = Ledger().rows()
    assert sorted(r.config["fold"] for r in rows) == [0, 1, 2] and {r.config["folds"] for r in rows} == {3}
    code, out, err = run_main(main, ["run", "--cache", str(path), "--folds", "3"], monkeypatch)
    assert code == 0 and len(Ledger().rows()) == 3  # a rerun trains nothing
    code, out, err = run_main(main, ["report", "--ci", "95", "--boot", "200"], monkeypatch)
    assert code == 0, err
    table = pd.read_csv(next((isolated_outputs / "reports").glob("report*.csv")))
    assert table["demo (accuracy)"][0] == pytest.approx(np.mean([r.test_primary for r in rows]), abs=1e-4)  # the folds' mean
    assert table["demo n"][0] == 3 and table["demo std"][0] > 0
    assert table["demo ci low"][0] <= table["demo (accuracy)"][0] <= table["demo ci high"][0]  # over the out-of-fold rows


@pytest.mark.parametrize("args, message", [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--folds", "3", "--seeds", "0,1"], "give --seed, not --seeds"),
    (["--folds", "3", "--fold-groups", "site"], "stores no such metadata column"),
])
def test_bad_fold_options_are_one_line(tmp_path, isolated_outputs, monkeypatch, args, message):
    path = grouped_cache(tmp_path / "c.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path), *args], monkeypatch)
    assert code != 0 and message in " ".join(err.split()) and "Traceback" not in err
