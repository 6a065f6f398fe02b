"""`probe` end to end: a tiny real extraction, then the command line as a user types it.

One run goes through the installed console script in a subprocess; the rest run its `main` in this
process (`tests.tiny.run_main`), which exercises the same parsing and error handling in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cache.layout import open_cache
from common.errors import MedfmError
from extract.runner import ExtractConfig, extract
from ledger.store import Ledger
from probe.cli import main, report
from probe.config import TrainConfig
from probe.run import run_probe
from tests.conftest import cli
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT_1, run_main


@pytest.fixture
def demo_cache(isolated_outputs: Path) -> Path:
    config = ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=TINY_SIZE, batch_size=64, workers=0,
                           overrides=TINY_VIT_1, dataset_options={"per_class": 10})
    return extract(config, QUIET).path


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_probe_run_twice_trains_once_and_report_shows_the_row(demo_cache, isolated_outputs, monkeypatch):
    args = ["run", "--head", "deit", "--backbone", "deit", "--dataset", "demo", "--epochs", "1",
            "--head-depth", "1", "--head-preset", "deit-t", "--batch-size", "8"]
    first = subprocess.run([cli("probe"), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert first.returncode == 0, first.stderr
    said = " ".join((first.stdout + first.stderr).split())
    assert "RANDOMLY initialised deit" in said  # the backbone's random weights, said loudly
    assert "deit head starts from RANDOM weights" in said
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    assert "already in the ledger" in out + err
    with open_cache(demo_cache, "deit", "demo") as reader:
        run_probe(reader, TrainConfig(epochs=2, batch_size=16), console=QUIET)
    assert [r.scenario for r in Ledger().rows()] == ["frozen-deit", "frozen-linear"]
    code, out, err = run_main(main, ["report", "--dataset", "demo"], monkeypatch)
    assert code == 0, err
    assert "RANDOM backbone" in out and (isolated_outputs / "reports" / "report-dataset-demo.png").exists()  # named by --dataset
    written = (isolated_outputs / "reports" / "report-dataset-demo.md").read_text()
    assert "deit frozen-linear (RANDOM backbone, off-recipe)" in written
    assert "deit frozen-deit (RANDOM backbone and head, extension, off-recipe)" in written


def test_layer_minus_4_trains_on_block_8_of_a_12_block_backbone(isolated_outputs, monkeypatch):
    """extract stores block -4 of 12 as `pooled@8`; probe --layer -4 resolves to the same array."""
    config = ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=TINY_SIZE, batch_size=64, workers=0,
                           layers=(-1, -4), tokens=False, overrides={**TINY_VIT_1, "depth": 12}, dataset_options={"per_class": 6})
    extract(config, QUIET)
    code, _, err = run_main(main, ["run", "--backbone", "deit", "--dataset", "demo", "--layer", "-4", "--epochs", "1"], monkeypatch)
    assert code == 0, err
    (row,) = Ledger().rows()
    assert row.config["feature"] == "pooled@8"
    code, _, err = run_main(main, ["run", "--backbone", "deit", "--dataset", "demo", "--layer", "-3", "--epochs", "1"], monkeypatch)
    assert code == 2 and "stores blocks 8 (-4), 11 (-1) of 12, not layer -3" in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "--backbone", "dinov2", "--dataset", "demo"], "run `extract run --backbone dinov2 --dataset demo` first"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--head", "mlp"], "unknown head 'mlp'; choose one of: linear, deit"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--grad-clip", "-1"], "--grad-clip must be a positive number"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--lr", "inf"], "--lr must be a positive number"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--lr", "1e-3,x"], "--lr takes comma-separated float values"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--weight-decay", "inf"], "--weight-decay must be a non-negative number"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--grad-clip", "nan"], "--grad-clip must be a positive number"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--lr", "1e-3,inf"], "--lr must be a positive number, got inf"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--weight-decay", "0,inf"], "--weight-decay must be a non-negative number"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--grad-clip", "nan"], "--grad-clip must be a positive number"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--grad-clip", "-1"], "--grad-clip must be a positive number"),
    (["sweep", "--backbone", "deit", "--dataset", "demo", "--layer", "last,abc"], "--layer takes comma-separated block indices"),
    (["report", "--max-ram", "2G"], "No such option"),
])
def test_a_user_mistake_gives_one_error_line_and_exit_2(demo_cache, monkeypatch, args, fragment):
    code, _, err = run_main(main, args, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0]
    assert Ledger().rows() == []  # nothing trained, nothing recorded


def test_report_of_an_empty_ledger_says_to_train_first():
    with pytest.raises(MedfmError, match="probe run"):
        report(dataset=None, out=None, ledger=None)


SETTINGS = {"root": "/data/demo", "manifest_hash": "m", "norm": {"kind": "model"},
            "transform": {"size": 224, "resize": 256, "mean": [0.5], "std": [0.5], "interpolation": "bicubic", "channels": 3}}


def cached(path: Path, **kw) -> Path:
    from tests.probe.caches import make_cache

    return make_cache(path, settings=SETTINGS, **kw)


def test_a_random_deit_head_on_a_pretrained_backbone_is_labelled_random_head_not_random_backbone(isolated_outputs, monkeypatch):
    path = cached(isolated_outputs / "c.h5", random_weights=False)
    code, out, err = run_main(main, ["run", "--cache", str(path), "--head", "deit", "--head-depth", "1", "--head-preset", "deit-t",
                                     "--epochs", "2", "--batch-size", "16"], monkeypatch)
    assert code == 0, err
    said = " ".join((out + err).split())
    assert "[RANDOM head weights, best epoch late]" in said and "RANDOM backbone" not in said and "RANDOMLY initialised" not in said
    (row,) = Ledger().rows()
    assert (row.backbone_random, row.head_random) == (False, True)
    code, out, err = run_main(main, ["report"], monkeypatch)
    assert code == 0, err
    written = (isolated_outputs / "reports" / "report.md").read_text()
    assert "| deit frozen-deit (RANDOM head, extension, off-recipe) |" in written and "RANDOM backbone" not in written
    assert "RANDOM head: a DeiT head whose ImageNet weights were missing" in written


def test_a_run_whose_best_epoch_is_the_last_is_flagged_in_the_ledger_and_the_report(isolated_outputs, monkeypatch):
    path = cached(isolated_outputs / "c.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path), "--epochs", "1", "--batch-size", "16", "--solver", "adamw"], monkeypatch)
    assert code == 0, err
    said = " ".join((out + err).split())
    assert "best validation epoch is 1 of 1, in the last tenth" in said and "raise --epochs or use --standardize" in said
    (row,) = Ledger().rows()
    assert row.late_best and row.dataset_label == "demo" and row.dataset_inputs["image_size"] == 224
    code, out, err = run_main(main, ["report"], monkeypatch)
    assert code == 0, err
    assert "(n=1, late)" in out and "raise --epochs" in " ".join(out.split())


def test_a_long_run_says_its_estimated_time_and_logs_plain_progress_lines_when_not_a_terminal(isolated_outputs, monkeypatch):
    """Each clock reading is 10 s later: 27 steps (3 epochs x 9) look like 4.5 minutes to the run."""
    from common.progress import Pace

    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(Pace, "clock", staticmethod(lambda: float(next(ticks))))
    path = cached(isolated_outputs / "c.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path), "--epochs", "3", "--batch-size", "16", "--solver", "adamw"], monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert "1 linear head(s): about 4 min for the whole run (estimated from the first 20 of 27 steps)" in lines
    plain = [line for line in lines if line.startswith("1 linear head(s): epoch")]
    assert len(plain) >= 3 and plain[0] == "1 linear head(s): epoch 1/3, step 3/27 (11%), 30 s elapsed, about 4 min left"


def test_sweep_and_report_combine_seeds_alike_and_pick_the_same_configuration(isolated_outputs, monkeypatch):
    from ledger.records import best_configuration, mean_score
    from report.table import build_report

    path = cached(isolated_outputs / "c.h5")
    code, out, err = run_main(main, ["sweep", "--cache", str(path), "--lr", "1e-3,3e-2", "--seed", "0,1,2", "--epochs", "2",
                                     "--batch-size", "16", "--solver", "adamw"], monkeypatch)
    assert code == 0, err
    best = best_configuration(Ledger().rows())
    assert len(best) == 3 and len({r.config["lr"] for r in best}) == 1
    test = mean_score([r.test_primary for r in best])
    said = " ".join(out.split())
    assert f"best by mean validation: linear head, pooled, lr {best[0].config['lr']:g}" in said
    assert "mean over 3 seeds (0, 1, 2)" in said and f"test accuracy {test:.4f} (n=3" in said
    report = build_report(Ledger().rows())
    key = ("deit", "frozen-linear", "probe", True, False, "medfm")
    assert report.table.loc[key, "demo"] == pytest.approx(test) and report.seeds.loc[key, "demo"] == 3


def test_report_names_columns_and_refuses_a_malformed_name(isolated_outputs, monkeypatch):
    path = cached(isolated_outputs / "c.h5")
    assert run_main(main, ["run", "--cache", str(path), "--epochs", "2", "--batch-size", "16"], monkeypatch)[0] == 0
    code, out, err = run_main(main, ["report", "--name", "demo=my synthetic set"], monkeypatch)
    assert code == 0, err
    assert "my synthetic set" in out and "(accuracy)" in out
    code, _, err = run_main(main, ["report", "--name", "nonsense"], monkeypatch)
    assert code == 2 and err.strip() == "error: --name expects LABEL=NAME or ID=NAME, got 'nonsense'"


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "--backbone", "deit", "--dataset", "demo", "--seeds", ""], "--seeds needs at least one value"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--seeds", "0,1.5"], "--seeds takes comma-separated int values, got '0,1.5'"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--seeds", "a"], "--seeds takes comma-separated int values"),
    (["run", "--backbone", "deit", "--dataset", "demo", "--seed", "1", "--seeds", "0,1"], "give --seed or --seeds, not both"),
    (["report", "--ci", "95", "--boot", "0"], "--boot must be at least 1 resample, got 0"),
    (["report", "--ci", "100"], "--ci is a confidence level in percent, strictly between 0 and 100"),
    (["report", "--ci", "-5"], "strictly between 0 and 100 (e.g. 95), got -5"),
    (["report", "--ci", "95", "--jobs", "0"], "--jobs must be at least 1"),
    (["report", "--ci", "95", "--boot-seed", "-1"], "--boot-seed must be a non-negative integer"),
    (["report", "--boot", "500"], "give --ci too"),
])
def test_bad_seeds_and_interval_settings_are_one_line_and_exit_2_before_any_work(monkeypatch, args, fragment):
    code, _, err = run_main(main, args, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0]


def test_run_with_seeds_trains_a_head_per_seed_in_one_sweep_and_the_report_gives_their_spread_and_intervals(isolated_outputs, monkeypatch):
    import pandas as pd

    path = cached(isolated_outputs / "c.h5")
    code, out, err = run_main(main, ["run", "--cache", str(path), "--seeds", "0,1,2,1", "--epochs", "2", "--batch-size", "16"], monkeypatch)
    assert code == 0, err
    said = " ".join(out.split())
    assert "trained 3 linear head(s) on pooled" in said  # one batched pass, not three runs
    rows = Ledger().rows()
    assert sorted(r.seed for r in rows) == [0, 1, 2] and len({r.config_key for r in rows}) == 3
    assert len({str({k: v for k, v in r.config.items() if k != "seed"}) for r in rows}) == 1  # one configuration, three seeds
    assert "mean over 3 seeds (0, 1, 2): val accuracy" in said and "(std over seeds)" in said
    code, out, err = run_main(main, ["run", "--cache", str(path), "--seed", "1", "--epochs", "2", "--batch-size", "16"], monkeypatch)
    assert code == 0 and "already in the ledger" in out + err  # `--seed 1` is the run `--seeds` trained
    code, out, err = run_main(main, ["report", "--ci", "90", "--boot", "200"], monkeypatch)
    assert code == 0, err
    csv = pd.read_csv(isolated_outputs / "reports" / "report-ci90-boot200.csv")  # named by the options that change it
    (line,) = csv.to_dict("records")
    assert line["demo n"] == 3 and line["demo std"] >= 0 and line["demo ci low"] <= line["demo (accuracy)"] <= line["demo ci high"]
    assert f"[{line['demo ci low']:.4f}, {line['demo ci high']:.4f}] (n=3" in (isolated_outputs / "reports" / "report-ci90-boot200.md").read_text()
    (Path(rows[1].run_dir) / "predictions.npz").unlink()  # a run of an older medfm
    code, _, err = run_main(main, ["report", "--ci", "95"], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has no stored predictions" in lines[0] and "retrain it with --force" in lines[0]
