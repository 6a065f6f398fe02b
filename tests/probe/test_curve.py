"""`probe curve`: nested, stratified, seeded train subsets from one cache, trained in the sweep's batched path."""

from __future__ import annotations

from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import cache.store
from cache.layout import open_cache
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from common.errors import MedfmError
from ledger.store import Ledger
from probe.cli import DEFAULT_FRACTIONS, main
from probe.config import TrainConfig
from probe.curve import curve_figure, run_curve, subset_config
from probe.data import FeatureSource
from probe.subsets import Subset, draw, subset_rows
from probe.sweep import run_sweep
from probe.train import train_head
from report.compare import best_runs
from scoring.health import chance_level
from tests.probe.caches import make_cache
from tests.tiny import MULTICLASS, MULTILABEL, QUIET, run_main

FRACTIONS = tuple(float(f) for f in DEFAULT_FRACTIONS.split(","))  # the command's default


def class_data(counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.array([f"img{i:04d}" for i in range(len(labels))]), labels


def test_subsets_are_stratified_nested_seeded_and_depend_on_the_ids_not_their_order():
    ids, labels = class_data({0: 300, 1: 60, 2: 7, 3: 1})
    for repeat in range(3):
        chosen = [set(ids[draw(ids, labels, Subset("fraction", f, repeat), MULTICLASS)]) for f in FRACTIONS]
        for smaller, larger in zip(chosen, chosen[1:], strict=False):
            assert smaller < larger or smaller == larger  # nested within a repeat
        assert chosen[-1] == set(ids)
        for f, subset in zip(FRACTIONS, chosen, strict=True):  # every class keeps its share, at least one row
            per_class = Counter(labels[np.isin(ids, list(subset))].tolist())
            assert per_class == {c: max(1, int(np.floor(f * n + 0.5))) for c, n in {0: 300, 1: 60, 2: 7, 3: 1}.items()}
    first, second = (set(ids[draw(ids, labels, Subset("fraction", 0.1, r), MULTICLASS)]) for r in (0, 1))
    assert first != second  # repeats draw other rows
    assert first == set(ids[draw(ids, labels, Subset("fraction", 0.1, 0), MULTICLASS)])  # the same draw again
    assert first != set(ids[draw(ids, labels, Subset("fraction", 0.1, 0, seed=1), MULTICLASS)])  # another subset seed
    order = np.random.default_rng(0).permutation(len(ids))
    assert first == set(ids[order][draw(ids[order], labels[order], Subset("fraction", 0.1, 0), MULTICLASS)])


def test_shots_take_k_rows_per_class_nested_and_refuse_a_class_too_small():
    ids, labels = class_data({0: 40, 1: 12, 2: 10, 3: 9})
    one, five = (set(draw(ids, labels, Subset("shots", k, 0), MULTICLASS).tolist()) for k in (1, 5))
    assert one < five and Counter(labels[sorted(five)].tolist()) == {0: 5, 1: 5, 2: 5, 3: 5}
    with pytest.raises(MedfmError, match="--shots 10: class 'd' has only 9 labelled train rows"):
        draw(ids, labels, Subset("shots", 10, 0), MULTICLASS)
    with pytest.raises(MedfmError, match="multilabel"):
        draw(ids, np.zeros((len(ids), 3)), Subset("shots", 1, 0), MULTILABEL)
    multilabel = draw(ids, np.zeros((len(ids), 3)), Subset("fraction", 0.5, 0), MULTILABEL)
    assert len(multilabel) == round(0.5 * len(ids))  # multilabel rows are drawn as one group
    for bad in ((("fraction", 0.0), "in \\(0, 1\\]"), (("fraction", 1.5), "in \\(0, 1\\]"), (("shots", 0), "at least 1")):
        with pytest.raises(MedfmError, match=bad[1]):
            Subset(*bad[0])


def test_a_subset_is_in_the_ledger_key_only_when_set_and_the_whole_split_is_a_plain_run():
    assert "train_subset" not in TrainConfig().to_dict()  # keys of runs before subsets existed are unchanged
    config = subset_config(TrainConfig(), Subset("fraction", 0.1, 2))
    assert config.seed == 2 and config.to_dict()["train_subset"] == {"kind": "fraction", "amount": 0.1, "repeat": 2, "seed": 0}
    whole = subset_config(TrainConfig(), Subset("fraction", 1, 1))
    assert whole.train_subset is None and whole.seed == 1


def _cache_with_skipped_rows(path):
    """20 train rows whose feature is the row index, rows 3 and 7 skipped at extraction."""
    meta = CacheMeta(BackboneInfo("deit"), DatasetInfo("demo"), Task("multiclass", ("a", "b")), layers=(0,), num_layers=1)
    plan = {s: SplitPlan([f"{s}{i}" for i in range(20)], np.arange(20) % 2, {"pooled": FeatureSpec((2,), "float32")})
            for s in ("train", "val", "test")}
    writer = CacheWriter.open(path, meta, plan)
    valid = np.ones(20, dtype=bool)
    valid[[3, 7]] = False
    for s in plan:
        writer.write(s, 0, {"pooled": np.tile(np.arange(20, dtype=np.float32)[:, None], (1, 2))}, valid)
    return writer.finalize()


def test_the_rows_filter_serves_only_those_train_rows_composes_with_valid_and_leaves_val_and_test(tmp_path):
    path = _cache_with_skipped_rows(tmp_path / "c.h5")
    with CacheReader(path) as reader:
        for max_ram in (1 << 30, 1 << 10):  # RAM, then streamed
            source = FeatureSource(reader, "pooled", batch_size=4, max_ram=max_ram, rows=np.array([0, 3, 5, 6, 9, 12, 15, 18, 19]))
            for epoch in (1, 2):
                batches = list(source.train_batches((0, epoch)))
                served = np.concatenate([b.features[:, 0] for b in batches])
                assert sorted(served.tolist()) == [0, 5, 6, 9, 12, 15, 18, 19]  # row 3 was skipped at extraction
                np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), served.astype(int) % 2)
            assert source.steps_per_epoch() == 2 and source.passes["train"] == 2
            assert np.concatenate([b.features[:, 0] for b in source.eval_batches("train")]).tolist() == [0, 5, 6, 9, 12, 15, 18, 19]
            assert source.labels("train").tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
            assert len(source.labels("val")) == len(source.labels("test")) == 18  # never filtered
        plain = FeatureSource(reader, "pooled", batch_size=4)
        assert len(plain.labels("train")) == 18  # no rows: every valid row, as before
        with pytest.raises(MedfmError, match="selects none"):
            FeatureSource(reader, "pooled", batch_size=4, rows=np.array([3, 7]))


def test_a_subset_head_of_the_sweep_equals_training_it_alone_on_those_rows(tmp_path):
    path = make_cache(tmp_path / "c.h5", separation=1.5)
    config = subset_config(TrainConfig(epochs=3, batch_size=16, lr=1e-2, solver="adamw"), Subset("fraction", 0.25, 1))
    with open_cache(path, None, None) as reader:
        record = run_sweep(reader, [config], device="cpu", console=QUIET).records[0]
        rows = subset_rows(reader, config.train_subset)
        alone = train_head(config, FeatureSource(reader, "pooled", 16, rows=rows), reader.task, torch.device("cpu"))
        classes = Counter(reader.labels("train").tolist())
    assert len(rows) == sum(int(np.floor(0.25 * n + 0.5)) for n in classes.values())  # a quarter of each class
    saved = torch.load(f"{record.run_dir}/head.pt", weights_only=True)
    torch.testing.assert_close(saved["linear.weight"], alone.state_dict["linear.weight"])
    assert record.val_score == alone.val_score and record.config["train_subset"]["amount"] == 0.25


def test_a_curve_of_6_fractions_x_3_repeats_trains_from_one_cache_and_a_rerun_trains_nothing(isolated_outputs, monkeypatch):
    path = make_cache(isolated_outputs / "features" / "deit" / "demo-aaaaaaaaaaaa.h5", separation=1.5)
    opens = []
    original = cache.store.CacheReader.__init__

    def counting(self, *args, **kwargs):
        opens.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache.store.CacheReader, "__init__", counting)
    monkeypatch.setenv("COLUMNS", "200")
    args = ["curve", "--backbone", "deit", "--dataset", "demo", "--fractions", ",".join(f"{f:g}" for f in FRACTIONS),
            "--repeats", "3", "--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--device", "cpu", "--solver", "adamw"]
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    assert [str(p) for p in opens] == [str(path)]  # one cache, opened once: nothing extracted, nothing reopened
    assert "deit (RANDOM): the options given (--epochs, --lr, --batch-size, --solver), not the report's choice" in out
    # 5 fractions x 3 repeats train on their own subsets; the whole split's 3 seeds share one pass: 16 groups x 2 epochs
    assert "18 heads trained, 0 already in the ledger (32 passes over train features)" in out
    rows = Ledger().rows()
    assert len(rows) == 18 and sum(1 for r in rows if "train_subset" not in r.config) == 3
    table = (isolated_outputs / "reports" / "curve.csv").read_text().splitlines()
    assert table[0] == "fraction,backbone,dataset,metric,mean,min,max,std,repeats,train_rows,test_rows,chance" and len(table) == 1 + 6
    assert table[1].startswith("0.0100,deit (RANDOM),demo,accuracy,") and ",3,144,48," in table[-1]
    assert (isolated_outputs / "reports" / "curve.png").stat().st_size > 10_000
    assert "0.01" in out and "deit (RANDOM)" in out
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    assert "0 heads trained, 18 already in the ledger (0 passes over train features)" in out and len(Ledger().rows()) == 18
    # `probe compare` picks cells as the report does, never from the curve's subsets
    assert all("train_subset" not in r.config for r in best_runs(Ledger(), "deit", "frozen-linear", "demo").records)


def test_probe_curve_refuses_bad_input_in_one_line_before_training(isolated_outputs, monkeypatch):
    make_cache(isolated_outputs / "features" / "deit" / "demo-aaaaaaaaaaaa.h5", rows={"train": 40, "val": 16, "test": 16})
    common = ["curve", "--backbone", "deit", "--dataset", "demo", "--epochs", "1"]
    cases = [
        (["--fractions", "0,0.5"], "--fractions must lie in (0, 1], got 0,0.5"),
        (["--fractions", "0.5,1.5"], "--fractions must lie in (0, 1], got 0.5,1.5"),
        (["--fractions", "half"], "--fractions takes comma-separated float values"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--shots", "0"], "--shots must be at least 1 row per class"),
        (["--shots", "1,50"], "--shots 50: class '"),
        (["--shots", "1", "--fractions", "0.5"], "--fractions and --shots draw different curves"),
        (["--head", "mlp"], "mlp"),
    ]
    for extra, message in cases:
        code, out, err = run_main(main, common + extra, monkeypatch)
        assert code == 2 and message in " ".join(err.split()), (extra, err)
        assert len(err.strip().splitlines()) == 1
    assert Ledger().rows() == []


def test_a_curve_trains_the_configuration_the_report_chose_on_that_cache_and_says_so(isolated_outputs, monkeypatch):
    make_cache(isolated_outputs / "features" / "deit" / "demo-aaaaaaaaaaaa.h5", separation=1.5)
    monkeypatch.setenv("COLUMNS", "400")
    curve = ["curve", "--backbone", "deit", "--dataset", "demo", "--fractions", "0.5,1", "--repeats", "1", "--device", "cpu"]
    for lr in ("1e-2", "3e-2"):  # two configurations: the report picks one by validation
        code, _, err = run_main(main, ["run", "--backbone", "deit", "--dataset", "demo", "--solver", "adamw", "--epochs", "2",
                                       "--batch-size", "16", "--lr", lr, "--device", "cpu"], monkeypatch)
        assert code == 0, err
    chosen = best_runs(Ledger(), "deit", "frozen-linear", "demo").records
    code, out, err = run_main(main, curve, monkeypatch)
    assert code == 0, err
    assert (f"deit (RANDOM): the configuration `probe report` chose for frozen-linear on this cache (runs {chosen[0].id}, best "
            f"mean validation {chosen[0].val_score:.4f}): linear head on pooled, AdamW lr {chosen[0].config['lr']:g}, weight decay "
            "1e-05, 2 epochs, batch 16") in out
    assert "1 heads trained, 1 already in the ledger" in out  # the whole split in that configuration is the chosen run itself
    subset = [r for r in Ledger().rows() if r.config.get("train_subset") and r.config.get("solver") != "lbfgs"]
    assert len(subset) == 1 and {k: subset[0].config[k] for k in ("lr", "epochs", "batch_size")} == {
        k: chosen[0].config[k] for k in ("lr", "epochs", "batch_size")}


def test_caches_with_different_test_sets_are_refused_in_one_line_unless_allowed_and_keep_their_own_row_counts(isolated_outputs,
                                                                                                             monkeypatch):
    first = make_cache(isolated_outputs / "a.h5", separation=1.5)
    second = make_cache(isolated_outputs / "b.h5", backbone="dinov2", rows={"train": 120, "val": 48, "test": 40}, settings={"b": 1})
    monkeypatch.setenv("COLUMNS", "400")
    args = ["curve", "--cache", str(first), "--cache", str(second), "--fractions", "0.25,1", "--repeats", "1", "--device", "cpu"]
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a.h5 and b.h5 hold different test sets (48 and 40 test rows, 40 ids shared)" in err and "--allow-mixed-test-sets" in err
    assert Ledger().rows() == []  # refused before anything trained
    code, out, err = run_main(main, [*args, "--allow-mixed-test-sets"], monkeypatch)
    assert code == 0, err
    assert ("deit (RANDOM): the ledger holds no frozen-linear run on this cache, so the default recipe: linear head on pooled, "
            "L-BFGS logistic regression (C on validation)") in out
    table = pd.read_csv(isolated_outputs / "reports" / "curve.csv")
    rows = table.set_index(["fraction", "backbone"])[["train_rows", "test_rows"]].to_dict("index")
    assert rows[(1.0, "deit (RANDOM)")] == {"train_rows": 144, "test_rows": 48}
    assert rows[(1.0, "dinov2 (RANDOM)")] == {"train_rows": 120, "test_rows": 40}  # each cache's own, never a mean of both
    assert "per cell" in out and ", 120 rows" in out and "the caches' test sets differ" in out


def test_the_curve_figure_draws_the_chance_level_and_the_train_rows_of_each_point(isolated_outputs):
    path = make_cache(isolated_outputs / "c.h5", separation=1.5)
    with open_cache(path, None, None) as reader:
        outcome = run_curve([reader], TrainConfig(), "fraction", [0.25, 1], 1, device="cpu", console=QUIET)
        level = chance_level("accuracy", reader.labels("test"))
    fig = curve_figure(outcome, outcome.table())
    ax = fig.axes[0]
    (chance,) = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert set(chance.get_ydata()) == {level} and chance.get_label() == f"chance ({level:.3f})"
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == [str(n) for n in outcome.table()["train_rows"]]  # 36 and 144 rows
    assert top.get_xlabel() == "train rows"
    plt.close(fig)
