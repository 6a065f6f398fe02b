"""`probe report`: cells chosen by validation, gain over the deit linear baseline, CSV/Markdown/PNG written."""

from __future__ import annotations

import pandas as pd
import pytest

from probe.report import AVERAGE, GAIN, make_report
from probe.results import Ledger, RunRecord

METRIC = {"aptos2019": "quadratic_kappa", "isic2019": "macro_recall"}


def add(ledger: Ledger, backbone: str, head: str, dataset: str, test: float, val: float = 0.5, lr: float = 1e-4,
        seed: int = 0, random: bool = False, freeze: str = "frozen", stage: str | None = None, head_random: bool = False) -> None:
    stage = stage or ("probe" if freeze == "frozen" else "finetune")
    ledger.add(RunRecord(
        stage=stage, scenario=f"{freeze}-{head}", backbone=backbone, dataset=dataset, head=head, config={"lr": lr},
        config_key=f"{stage}{backbone}{head}{dataset}{lr}{seed}{random}{freeze}{head_random}", cache_fingerprint="f", seed=seed,
        primary_metric=METRIC[dataset], val_score=val, test_metrics={METRIC[dataset]: test}, test_primary=test,
        backbone_random=random, head_random=head_random,
    ))


def row(backbone: str, scenario: str, stage: str = "probe", random: bool = False, head_random: bool = False) -> tuple:
    return (backbone, scenario, stage, random, head_random)


@pytest.fixture
def ledger(isolated_outputs):
    ledger = Ledger()
    add(ledger, "deit", "linear", "aptos2019", 0.75)
    add(ledger, "deit", "linear", "isic2019", 0.50)
    add(ledger, "dinov2", "linear", "aptos2019", 0.80)
    add(ledger, "dinov2", "linear", "isic2019", 0.60, val=0.7, seed=0)
    add(ledger, "dinov2", "linear", "isic2019", 0.70, val=0.7, seed=1)  # same config, another seed: averaged
    add(ledger, "dinov2", "linear", "isic2019", 0.99, val=0.1, lr=1e-3)  # better on test, worse on val: not chosen
    add(ledger, "sam", "deit", "aptos2019", 0.60)
    add(ledger, "sam", "linear", "aptos2019", 0.90, random=True)
    return ledger


def test_report_selects_by_validation_and_computes_gain_over_deit_linear(ledger, isolated_outputs):
    report = make_report(ledger, out=isolated_outputs / "reports")
    table = report.table
    dinov2 = table.loc[row("dinov2", "frozen-linear")]
    assert dinov2["isic2019"] == pytest.approx(0.65)  # mean of the two seeds of the best-validation config
    assert dinov2[AVERAGE] == pytest.approx((0.80 + 0.65) / 2)
    assert dinov2[GAIN] == pytest.approx(((0.80 - 0.75) / 0.75 + (0.65 - 0.50) / 0.50) / 2 * 100)
    assert table.loc[row("deit", "frozen-linear")][GAIN] == pytest.approx(0.0)
    assert table.loc[row("sam", "frozen-deit")][GAIN] == pytest.approx(-20.0)
    assert report.metrics == METRIC


def test_report_writes_csv_markdown_and_png_and_marks_random_weights(ledger, isolated_outputs):
    out = isolated_outputs / "reports"
    report = make_report(ledger, out=out)
    assert set(report.files) == {"csv", "markdown", "figure"}
    csv = pd.read_csv(report.files["csv"])
    assert "sam frozen-linear (RANDOM backbone)" in set(csv["row"])
    assert {"aptos2019", "isic2019", AVERAGE, GAIN} <= set(csv.columns)
    markdown = report.files["markdown"].read_text()
    assert "aptos2019 (quadratic_kappa)" in markdown and "RANDOM backbone: features of an untrained backbone" in markdown
    assert report.files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_can_be_limited_to_some_datasets(ledger):
    report = make_report(ledger, datasets=["isic2019"])
    assert list(report.table.columns) == ["isic2019", AVERAGE, GAIN]
    assert report.runs == 4


def test_partial_unfreezing_is_its_own_row_compared_with_deit_at_the_same_setting(ledger, isolated_outputs):
    add(ledger, "deit", "linear", "aptos2019", 0.80, freeze="last2")
    add(ledger, "sam", "linear", "aptos2019", 0.88, freeze="last2")
    add(ledger, "sam", "linear", "aptos2019", 0.70, freeze="unfrozen")
    table = make_report(ledger, out=isolated_outputs / "reports").table
    assert table.loc[row("sam", "last2-linear", "finetune")]["aptos2019"] == pytest.approx(0.88)
    assert table.loc[row("sam", "unfrozen-linear", "finetune")]["aptos2019"] == pytest.approx(0.70)  # not mixed with last2
    assert table.loc[row("sam", "last2-linear", "finetune")][GAIN] == pytest.approx(10.0)
    assert pd.isna(table.loc[row("sam", "unfrozen-linear", "finetune")][GAIN])  # no unfrozen deit baseline in this ledger


def test_a_frozen_scenario_trained_end_to_end_is_its_own_row_never_mixed_with_the_cached_probe(ledger, isolated_outputs):
    """finetune --freeze all and probe run are both frozen-linear, but different protocols: two rows, never one mean."""
    add(ledger, "dinov2", "linear", "aptos2019", 0.60, stage="finetune")
    add(ledger, "deit", "linear", "aptos2019", 0.50, stage="finetune")
    report = make_report(ledger, out=isolated_outputs / "reports")
    table = report.table
    assert table.loc[row("dinov2", "frozen-linear")]["aptos2019"] == pytest.approx(0.80)
    assert table.loc[row("dinov2", "frozen-linear", "finetune")]["aptos2019"] == pytest.approx(0.60)
    # each row's gain is over the deit linear baseline of its own stage
    assert table.loc[row("dinov2", "frozen-linear", "finetune")][GAIN] == pytest.approx(20.0)
    assert "dinov2 frozen-linear (end to end)" in set(pd.read_csv(report.files["csv"])["row"])


def test_a_random_deit_head_on_a_pretrained_backbone_says_so_and_not_that_the_backbone_is_random(ledger, isolated_outputs):
    add(ledger, "dinov2", "deit", "aptos2019", 0.70, head_random=True)
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert report.table.loc[row("dinov2", "frozen-deit", head_random=True)]["aptos2019"] == pytest.approx(0.70)
    assert "dinov2 frozen-deit (RANDOM head)" in set(pd.read_csv(report.files["csv"])["row"])
