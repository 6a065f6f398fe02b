"""`probe report` with `probe eval` scores: the robustness table (relative drop per corruption kind, averaged over
severities, MedMNIST-C style, plus their mean) and the transfer table (score on the target, in-domain beside it)."""

from __future__ import annotations

import pandas as pd
import pytest

from cache.schema import DatasetInfo
from ledger.records import EvaluationRecord, RunRecord
from ledger.store import Ledger
from probe.cli import main
from report.table import MEAN_DROP, make_report
from tests.ledgers import identity, train
from tests.probe.caches import DERM, clean_cache, derived, view
from tests.tiny import run_main


def run(ledger: Ledger, backbone: str, test: float, *, seed: int = 0, lr: float = 1e-4, val: float = 0.5) -> RunRecord:
    record = RunRecord(stage="probe", scenario="frozen-linear", backbone=backbone, dataset="aptos2019", head="linear",
                       config={"lr": lr}, config_key=f"{backbone}{seed}{lr}", cache_fingerprint="f", seed=seed,
                       primary_metric="quadratic_kappa", val_score=val, test_metrics={"quadratic_kappa": test}, test_primary=test,
                       backbone_random=False).with_identity(identity("aptos2019"))
    ledger.add(record)
    return record


def scored(ledger: Ledger, of: RunRecord, score: float, kind: str = "", severity: int | None = None, dataset: str = "aptos2019") -> None:
    target = identity(dataset)
    ledger.add_evaluation(EvaluationRecord(
        run_id=of.id, run_key=of.config_key, trained_dataset_id=of.dataset_id, dataset=dataset, dataset_id=target.id,
        dataset_label=target.label, corruption_kind=kind, corruption_severity=severity, cache=f"{dataset}+{kind}-{severity}.h5",
        cache_fingerprint=f"{dataset}{kind}{severity}", primary_metric="quadratic_kappa", score=score, metrics={}, scored_rows=10))


def test_the_drop_is_averaged_over_severities_then_kinds_and_seeds_are_averaged_before_it(isolated_outputs):
    ledger = Ledger()
    deit = run(ledger, "deit", 0.8)
    scored(ledger, deit, 0.72, "gaussian_noise", 1)  # 10 % drop
    scored(ledger, deit, 0.56, "gaussian_noise", 3)  # 30 % drop
    scored(ledger, deit, 0.76, "motion_blur", 1)  # 5 % drop
    seeds = [run(ledger, "dinov2", 0.8, seed=0), run(ledger, "dinov2", 0.6, seed=1)]
    scored(ledger, seeds[0], 0.7, "gaussian_noise", 2)
    scored(ledger, seeds[1], 0.5, "gaussian_noise", 2)  # clean 0.7, corrupted 0.6 over the seeds
    loser = run(ledger, "dinov2", 0.99, lr=1e-3, val=0.1)  # worse by validation: not the cell's configuration
    scored(ledger, loser, 0.1, "gaussian_noise", 2)
    scored(ledger, deit, 0.8)  # its own test split again: neither table
    report = make_report(ledger, out=isolated_outputs / "reports")
    table = report.evaluations.robustness
    assert table.loc[("deit frozen-linear", "aptos2019"), "gaussian_noise"] == pytest.approx(20.0)
    assert table.loc[("deit frozen-linear", "aptos2019"), "motion_blur"] == pytest.approx(5.0)
    assert table.loc[("deit frozen-linear", "aptos2019"), MEAN_DROP] == pytest.approx(12.5)
    assert table.loc[("dinov2 frozen-linear", "aptos2019"), "gaussian_noise"] == pytest.approx((0.7 - 0.6) / 0.7 * 100)
    assert pd.isna(table.loc[("dinov2 frozen-linear", "aptos2019"), "motion_blur"])
    assert list(table.columns) == ["gaussian_noise", "motion_blur", MEAN_DROP]
    assert report.evaluations.left_out == 1 and report.evaluations.transfer.empty
    written = (isolated_outputs / "reports" / "report.md").read_text()
    assert "## Robustness: relative drop (%) under corruption" in written and "## Transfer" not in written
    assert "| deit frozen-linear | aptos2019 | +20.00 | +5.00 | +12.50 |" in written
    assert "1 probe eval score is in neither table" in written
    csv = pd.read_csv(report.files["robustness"])
    assert list(csv.columns) == ["backbone x scenario", "dataset", "gaussian_noise", "motion_blur", MEAN_DROP]


def test_the_transfer_table_gives_the_target_score_with_the_in_domain_one(isolated_outputs):
    ledger = Ledger()
    deit = run(ledger, "deit", 0.75)
    scored(ledger, deit, 0.6, dataset="messidor2")
    scored(ledger, deit, 0.4, dataset="idrid")
    report = make_report(ledger, out=isolated_outputs / "reports")
    tables = report.evaluations
    assert tables.robustness.empty
    assert tables.transfer.loc["deit frozen-linear", "aptos2019 -> messidor2"] == pytest.approx(0.6)
    assert tables.in_domain.loc["deit frozen-linear", "aptos2019 -> idrid"] == pytest.approx(0.75)
    written = (isolated_outputs / "reports" / "report.md").read_text()
    assert "| deit frozen-linear | 0.4000 (0.7500) | 0.6000 (0.7500) |" in written
    assert list(pd.read_csv(report.files["transfer"]).columns) == [
        "backbone x scenario", "aptos2019 -> idrid", "aptos2019 -> messidor2", "aptos2019 -> idrid in-domain", "aptos2019 -> messidor2 in-domain"]


def test_a_report_without_evaluations_has_neither_table(isolated_outputs):
    ledger = Ledger()
    run(ledger, "deit", 0.75)
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert report.evaluations is None and "robustness" not in report.files
    assert "## Robustness" not in (isolated_outputs / "reports" / "report.md").read_text()


def test_probe_report_shows_both_tables_for_a_ledger_made_by_probe_eval(isolated_outputs, monkeypatch):
    clean = clean_cache(isolated_outputs)
    run_id = train(clean, standardize=True)
    for kind, severity, noise in (("gaussian_noise", 1, 0.5), ("gaussian_noise", 3, 2.0), ("contrast", 2, 1.0)):
        view(clean, kind, severity, noise)
    other = derived(clean, isolated_outputs / "derm.h5", settings={"dataset": "derm", "root": "/data/derm"},
                    relabel=lambda y: y % 3, dataset=DatasetInfo("derm"), task=DERM,
                    label_maps={"demo": {"A": "a", "B": "b", "C": "c"}})
    for args in (["--corrupted"], ["--cache", str(other)]):
        code, _, err = run_main(main, ["eval", str(run_id), *args], monkeypatch)
        assert code == 0, err
    code, out, err = run_main(main, ["report"], monkeypatch)
    assert code == 0, err
    said = " ".join(out.split())
    assert "relative drop (%) under corruption" in said and "transfer to other datasets" in said and "demo -> derm" in said
    (clean_run,) = Ledger().rows()
    found = {(e.corruption_kind, e.corruption_severity): e.score for e in Ledger().evaluations()}
    drop = lambda score: (clean_run.test_primary - score) / clean_run.test_primary * 100  # noqa: E731
    expected = (drop(found[("gaussian_noise", 1)]) + drop(found[("gaussian_noise", 3)])) / 2
    table = make_report(Ledger()).evaluations
    assert table.robustness.loc[("deit frozen-linear (RANDOM backbone, off-recipe)", "demo"), "gaussian_noise"] == pytest.approx(expected)
    assert table.transfer.loc["deit frozen-linear (RANDOM backbone, off-recipe)", "demo -> derm"] == pytest.approx(found[("", None)])
    code, out, _ = run_main(main, ["report", "--evaluations", "transfer"], monkeypatch)
    assert code == 0 and "transfer to other datasets" in out and "under corruption" not in out
    written = (isolated_outputs / "reports" / "report.md").read_text()
    assert "## Robustness" in written and "## Transfer to other datasets" in written
