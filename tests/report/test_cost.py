"""What a result cost: device seconds of each run and of the extraction it read, in the ledger, the cache and the report."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from cache.layout import open_cache
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from extract.runner import ExtractConfig, extract
from ledger.records import RunRecord
from ledger.store import Ledger
from probe.cli import main
from probe.config import TrainConfig
from probe.run import run_probe
from probe.sweep import Grid, expand, run_sweep
from report.table import cost_of, cost_text, make_report
from tests.ledgers import identity
from tests.tiny import MULTICLASS, QUIET, TINY_SIZE, TINY_VIT, run_main


def add(ledger: Ledger, backbone: str, test: float, *, cache: str, seconds: float | None, device: str = "cuda (H200)",
        extract: float | None = 3600.0, extract_device: str = "cuda (H200)", val: float = 0.5, lr: float = 1e-4,
        stage: str = "probe", seed: int = 0) -> RunRecord:
    record = RunRecord(
        stage=stage, scenario="frozen-linear" if stage == "probe" else "unfrozen-linear", backbone=backbone, dataset="aptos2019",
        head="linear", config={"lr": lr}, config_key=f"{backbone}{lr}{stage}{seed}{cache}", cache_fingerprint=cache if stage == "probe" else None,
        seed=seed, primary_metric="quadratic_kappa", val_score=val, test_metrics={"quadratic_kappa": test}, test_primary=test,
        backbone_random=False, device=device, cost_seconds=seconds, extract_seconds=extract if stage == "probe" else None,
        extract_device=extract_device if stage == "probe" else "",
    ).with_identity(identity("aptos2019"))
    ledger.add(record)
    return record


@pytest.fixture
def ledger(isolated_outputs):
    ledger = Ledger()
    add(ledger, "deit", 0.70, cache="c-deit", seconds=360, extract=1800)
    add(ledger, "dinov2", 0.80, cache="c-dino", seconds=360, val=0.9, seed=0)  # chosen, two seeds on one cache
    add(ledger, "dinov2", 0.82, cache="c-dino", seconds=720, val=0.9, seed=1)
    add(ledger, "dinov2", 0.99, cache="c-dino", seconds=3600, val=0.1, lr=1e-3)  # not chosen: counted in the total only
    add(ledger, "dinov2", 0.60, cache=None, seconds=7200, device="cpu", stage="finetune")
    return ledger


def test_a_rows_cost_sums_its_chosen_runs_and_each_caches_extraction_once_and_the_total_counts_every_run(ledger, isolated_outputs):
    report = make_report(ledger, out=isolated_outputs / "reports")
    dino = ("dinov2", "frozen-linear", "probe", False, False, "medfm")
    # 360 + 720 s of the two chosen seeds + 3600 s of their one cache's extraction (recorded by each run, counted once)
    assert report.costs[dino] == {"GPU": 4680.0, "CPU": 0.0, "unrecorded": 0.0}
    assert cost_text(report.costs[dino]) == "1.30 GPU-h"
    assert cost_text(report.costs[("dinov2", "unfrozen-linear", "finetune", False, False, "medfm")]) == "2.00 CPU-h"
    # every run (360 + 360 + 720 + 3600 GPU s, 7200 CPU s) plus two caches' extraction once each (1800 + 3600)
    assert report.total_cost == {"GPU": 10440.0, "CPU": 7200.0, "unrecorded": 0.0}
    csv = pd.read_csv(report.files["csv"]).set_index("row")
    assert csv.loc["dinov2 frozen-linear", "cost GPU-h"] == pytest.approx(1.3)
    assert csv.loc["dinov2 unfrozen-linear (1/1 datasets)" if "dinov2 unfrozen-linear (1/1 datasets)" in csv.index
                   else "dinov2 unfrozen-linear", "cost CPU-h"] == pytest.approx(2.0)
    assert "Total cost of the grid (every run, each cache's extraction once): 2.90 GPU-h + 2.00 CPU-h." in report.files["markdown"].read_text()


def test_probe_report_cost_prints_each_rows_cost_and_the_grids_total(ledger, monkeypatch):
    code, out, _ = run_main(main, ["report", "--cost"], monkeypatch)
    assert code == 0
    assert "1.30 GPU-h" in out and "0.60 GPU-h" in out  # deit: 360 s + its cache's 1800 s
    assert "total cost of the grid (5 runs, each cache's extraction once): 2.90 GPU-h + 2.00 CPU-h" in " ".join(out.split())
    code, plain, _ = run_main(main, ["report"], monkeypatch)
    assert code == 0 and "GPU-h" not in plain


def test_a_ledger_from_before_the_cost_columns_gains_them_and_its_rows_read_as_unrecorded(isolated_outputs):
    path = isolated_outputs / "old.sqlite"
    Ledger(path)
    with sqlite3.connect(path) as db:  # today's table without the cost columns: an older ledger
        for column in ("device", "cost_seconds", "throughput", "extract_seconds", "extract_device"):
            db.execute(f"ALTER TABLE runs DROP COLUMN {column}")
        db.execute("INSERT INTO runs (stage, scenario, backbone, dataset, head, config, config_key, cache_fingerprint, seed, "
                   "primary_metric, test_metrics, test_primary, backbone_random, head_random, created) VALUES ('probe', "
                   "'frozen-linear', 'deit', 'demo', 'linear', '{}', 'k', 'f', 0, 'accuracy', '{}', 0.5, 0, 0, 'then')")
    rows = Ledger(path).rows()
    assert (rows[0].device, rows[0].cost_seconds, rows[0].extract_seconds) == ("", None, None)
    assert cost_of(rows) == {"GPU": 0.0, "CPU": 0.0, "unrecorded": 2.0}  # the run and its cache
    assert cost_text(cost_of(rows)) == "-"


def test_a_resumed_extraction_adds_its_seconds_to_the_caches_recorded_cost(tmp_path):
    meta = CacheMeta(BackboneInfo("deit"), DatasetInfo("demo"), MULTICLASS, layers=(0,), num_layers=1)
    plan = {"train": SplitPlan(["a", "b"], np.array([0, 1]), {"pooled": FeatureSpec((2,), "float32")})}
    path = tmp_path / "c.h5"
    writer = CacheWriter.open(path, meta, plan)
    writer.write("train", 0, {"pooled": np.zeros((1, 2), np.float32)})
    writer.add_cost(10.0, "cpu")
    writer.close()  # killed part-way: the partial keeps its seconds
    writer = CacheWriter.open(path, meta, plan)
    writer.write("train", 1, {"pooled": np.zeros((1, 2), np.float32)})
    writer.add_cost(5.5, "cpu")
    writer.finalize()
    with CacheReader(path) as reader:
        assert (reader.meta.extract_seconds, reader.meta.extract_device) == (15.5, "cpu")
    assert CacheMeta.from_json(meta.to_json()).extract_seconds == 0.0  # a cache of before the field: not recorded


def test_extraction_then_probe_run_and_sweep_record_device_cost_throughput_and_the_caches_extraction(isolated_outputs):
    result = extract(ExtractConfig(backbone="deit", dataset="demo", weights="random", out=isolated_outputs / "features",
                                   batch_size=8, image_size=TINY_SIZE, workers=0, overrides=TINY_VIT, tokens=False,
                                   device="cpu", dataset_options={"per_class": 6}), QUIET)
    with open_cache(result.path, "deit", "demo") as reader:
        meta = reader.meta
        assert meta.extract_seconds > 0 and meta.extract_device == "cpu"
        single = run_probe(reader, TrainConfig(epochs=2, batch_size=8, solver="adamw"), device="cpu").record
        swept = run_sweep(reader, expand(reader, Grid(lrs=(1e-3, 1e-2)), TrainConfig(epochs=3, batch_size=8, solver="adamw")), device="cpu").records
        train_rows = len(reader.ids("train"))
    assert (single.device, single.extract_seconds, single.extract_device) == ("cpu", meta.extract_seconds, "cpu")
    assert single.cost_seconds == single.total_seconds > 0
    assert single.throughput == pytest.approx(2 * train_rows / single.train_seconds)
    for run in swept:  # two heads trained in one pass: each run's cost is half of the pass
        assert run.cost_seconds == pytest.approx(run.total_seconds / 2)
        assert run.throughput == pytest.approx(3 * train_rows / run.train_seconds)
    rows = Ledger().rows()
    assert cost_of(rows)["CPU"] == pytest.approx(sum(r.cost_seconds for r in rows) + meta.extract_seconds)  # one cache: once
