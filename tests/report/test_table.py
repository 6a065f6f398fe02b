"""`probe report`: cells chosen by validation, one column per dataset identity, honest row marks, gain over the deit
linear baseline, CSV/Markdown/PNG written."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from common.errors import MedfmError
from ledger.predictions import Predictions, save_predictions
from ledger.records import RunRecord, dataset_identity
from ledger.store import Ledger
from probe.cli import main
from report.table import (
    AVERAGE,
    GAIN,
    MAX_STEM,
    build_report,
    gain_chart,
    make_report,
    notes,
    recipe_departures,
    report_stem,
    score_chart,
)
from scoring.metrics import compute_metrics
from tests.ledgers import identity
from tests.tiny import MULTICLASS, MULTILABEL, run_main

METRIC = {"aptos2019": "quadratic_kappa", "isic2019": "macro_recall", "csv": "accuracy"}


def add(ledger: Ledger, backbone: str, head: str, dataset: str, test: float, val: float = 0.5, lr: float = 1e-4,
        seed: int = 0, random: bool = False, freeze: str = "frozen", stage: str | None = None, head_random: bool = False,
        protocol: str | None = None, epochs: int = 100, late: bool = False, size: int = 224, root: str | None = None,
        manifest: str = "m", metric: str | None = None, named: bool = True, run_dir: str | None = None) -> RunRecord:
    stage = stage or ("probe" if freeze == "frozen" else "finetune")
    metric = metric or METRIC[dataset]
    config = {"lr": lr, "epochs": epochs, **({"protocol": protocol} if protocol else {})}
    record = RunRecord(
        stage=stage, scenario=f"{freeze}-{head}", backbone=backbone, dataset=dataset, head=head, config=config,
        config_key=f"{stage}{backbone}{head}{dataset}{lr}{seed}{random}{freeze}{head_random}{protocol}{epochs}{size}{root}{manifest}{named}",
        cache_fingerprint="f", seed=seed, primary_metric=metric, val_score=val, test_metrics={metric: test}, test_primary=test,
        backbone_random=random, head_random=head_random, late_best=late, run_dir=run_dir,
    )
    if named:
        record.with_identity(identity(dataset, size, root, manifest))
    ledger.add(record)
    return record


def row(backbone: str, scenario: str, stage: str = "probe", random: bool = False, head_random: bool = False,
        protocol: str = "medfm") -> tuple:
    return (backbone, scenario, stage, random, head_random, protocol)


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
    assert report.seeds.loc[row("dinov2", "frozen-linear"), "isic2019"] == 2
    assert report.cell(row("dinov2", "frozen-linear"), "isic2019") == "0.6500 (n=2)"
    assert dinov2[AVERAGE] == pytest.approx((0.80 + 0.65) / 2)
    assert dinov2[GAIN] == pytest.approx(((0.80 - 0.75) / 0.75 + (0.65 - 0.50) / 0.50) / 2 * 100)
    assert table.loc[row("deit", "frozen-linear")][GAIN] == pytest.approx(0.0)
    assert report.metrics == {"aptos2019": "quadratic_kappa", "isic2019": "macro_recall"}


def test_a_row_that_lacks_a_dataset_is_marked_and_left_out_of_average_and_gain_unless_partial(ledger):
    report = make_report(ledger)
    sam = row("sam", "frozen-deit")
    assert math.isnan(report.table.loc[sam, AVERAGE]) and math.isnan(report.table.loc[sam, GAIN])
    assert report.rows[sam].label == "sam frozen-deit (1/2 datasets)" and not report.rows[sam].included
    partial = make_report(ledger, partial=True)
    assert partial.table.loc[sam, GAIN] == pytest.approx(-20.0) and partial.table.loc[sam, AVERAGE] == pytest.approx(0.60)
    assert partial.rows[sam].label == "sam frozen-deit (1/2 datasets)"  # still marked


def test_report_writes_csv_markdown_and_png_and_marks_random_weights(ledger, isolated_outputs):
    out = isolated_outputs / "reports"
    report = make_report(ledger, out=out)
    assert {name: path.name for name, path in report.files.items()} == {
        "csv": "report.csv", "markdown": "report.md", "figure": "report.png", "scores": "report-scores.png"}
    csv = pd.read_csv(report.files["csv"])
    assert "sam frozen-linear (RANDOM backbone, 1/2 datasets)" in set(csv["row"])
    assert {"aptos2019 (quadratic_kappa)", "isic2019 (macro_recall)", "aptos2019 n", AVERAGE, GAIN, "recipe", "datasets",
            "protocol", "late_best"} <= set(csv.columns)
    dinov2 = csv[csv["row"] == "dinov2 frozen-linear"].iloc[0]
    assert dinov2["isic2019 n"] == 2 and dinov2["recipe"] == "study" and dinov2["datasets"] == "2/2"
    markdown = report.files["markdown"].read_text()
    assert "aptos2019 (quadratic_kappa)" in markdown and "RANDOM backbone: features of an untrained backbone" in markdown
    assert "0.6500 (n=2)" in markdown
    assert report.files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_can_be_limited_to_some_datasets(ledger):
    report = make_report(ledger, datasets=["isic2019"])
    assert list(report.table.columns) == ["isic2019", AVERAGE, GAIN]
    assert report.runs == 4


def test_partial_unfreezing_is_its_own_row_compared_with_deit_at_the_same_setting(ledger, isolated_outputs):
    add(ledger, "deit", "linear", "aptos2019", 0.80, freeze="last2")
    add(ledger, "sam", "linear", "aptos2019", 0.88, freeze="last2")
    add(ledger, "sam", "linear", "aptos2019", 0.70, freeze="unfrozen")
    report = make_report(ledger, out=isolated_outputs / "reports", partial=True)
    table = report.table
    assert table.loc[row("sam", "last2-linear", "finetune")]["aptos2019"] == pytest.approx(0.88)
    assert table.loc[row("sam", "unfrozen-linear", "finetune")]["aptos2019"] == pytest.approx(0.70)  # not mixed with last2
    assert table.loc[row("sam", "last2-linear", "finetune")][GAIN] == pytest.approx(10.0)
    assert pd.isna(table.loc[row("sam", "unfrozen-linear", "finetune")][GAIN])  # no unfrozen deit baseline in this ledger
    assert "extension" in report.rows[row("sam", "last2-linear", "finetune")].label  # the study did not unfreeze partly


def test_a_frozen_scenario_trained_end_to_end_is_its_own_row_never_mixed_with_the_cached_probe(ledger, isolated_outputs):
    """finetune --freeze all and probe run are both frozen-linear, but different protocols: two rows, never one mean."""
    add(ledger, "dinov2", "linear", "aptos2019", 0.60, stage="finetune")
    add(ledger, "deit", "linear", "aptos2019", 0.50, stage="finetune")
    report = make_report(ledger, out=isolated_outputs / "reports", partial=True)
    table = report.table
    assert table.loc[row("dinov2", "frozen-linear")]["aptos2019"] == pytest.approx(0.80)
    assert table.loc[row("dinov2", "frozen-linear", "finetune")]["aptos2019"] == pytest.approx(0.60)
    # each row's gain is over the deit linear baseline of its own stage
    assert table.loc[row("dinov2", "frozen-linear", "finetune")][GAIN] == pytest.approx(20.0)
    assert "dinov2 frozen-linear (end to end, 1/2 datasets)" in set(pd.read_csv(report.files["csv"])["row"])


def test_a_random_deit_head_on_a_pretrained_backbone_says_so_and_not_that_the_backbone_is_random(ledger, isolated_outputs):
    add(ledger, "dinov2", "deit", "aptos2019", 0.70, head_random=True)
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert report.table.loc[row("dinov2", "frozen-deit", head_random=True)]["aptos2019"] == pytest.approx(0.70)
    assert "dinov2 frozen-deit (RANDOM head, 1/2 datasets)" in set(pd.read_csv(report.files["csv"])["row"])


def test_two_same_named_user_datasets_of_different_content_and_metrics_are_two_columns_headed_apart(isolated_outputs):
    ledger = Ledger()
    ward_a = add(ledger, "deit", "linear", "csv", 0.70, root="/data/ward-a", manifest="a", metric="accuracy")
    ward_b = add(ledger, "deit", "linear", "csv", 0.90, root="/data/ward-b", manifest="b", metric="roc_auc")
    add(ledger, "dinov2", "linear", "csv", 0.77, root="/data/ward-a", manifest="a", metric="accuracy")
    add(ledger, "dinov2", "linear", "csv", 0.81, root="/data/ward-b", manifest="b", metric="roc_auc")
    assert ward_a.dataset_label.startswith("csv:") and ward_a.dataset_label != ward_b.dataset_label
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert report.metrics == {ward_a.dataset_label: "accuracy", ward_b.dataset_label: "roc_auc"}
    dinov2 = report.table.loc[row("dinov2", "frozen-linear")]
    assert dinov2[ward_a.dataset_label] == pytest.approx(0.77) and dinov2[ward_b.dataset_label] == pytest.approx(0.81)
    assert dinov2[GAIN] == pytest.approx(((0.77 - 0.70) / 0.70 + (0.81 - 0.90) / 0.90) / 2 * 100)
    csv = pd.read_csv(report.files["csv"])
    assert {f"{ward_a.dataset_label} (accuracy)", f"{ward_b.dataset_label} (roc_auc)"} <= set(csv.columns)
    named = make_report(ledger, names={ward_a.dataset_label: "ward-a", ward_b.dataset_id[:6]: "ward-b"})
    assert named.metrics == {"ward-a": "accuracy", "ward-b": "roc_auc"}


def fed(ledger: Ledger, backbone: str, test: float, *, norm: str = "model", interpolation: str = "bicubic", size: int = 64,
        dataset: str = "imagefolder", root: str = "/data/mine", stage: str = "probe") -> RunRecord:
    """A run on one folder of the user's own data, its backbone fed it its own way (norm, resize, size)."""
    record = RunRecord(stage=stage, scenario="frozen-linear", backbone=backbone, dataset=dataset, head="linear",
                       config={"lr": 1e-4}, config_key=f"{backbone}{norm}{interpolation}{size}{root}", cache_fingerprint="f", seed=0,
                       primary_metric="accuracy", val_score=0.5, test_metrics={"accuracy": test}, test_primary=test,
                       backbone_random=True)
    record.with_identity(dataset_identity(dataset, root=root, manifest_hash="m", options={}, image_size=size, channels=3,
                                          norm=norm, interpolation=interpolation))
    ledger.add(record)
    return record


def test_two_backbones_on_one_folder_share_a_column_with_a_gain_whatever_their_own_pipelines(isolated_outputs):
    """The newcomer's case: deit resizes bicubic, resnet152 bilinear; one column, a gain and an average, no mark."""
    ledger = Ledger()
    fed(ledger, "deit", 0.80)
    fed(ledger, "resnet152", 0.60, interpolation="bilinear")
    report = make_report(ledger, out=isolated_outputs / "reports")
    (label,) = report.metrics
    assert label.startswith("imagefolder:") and "(" not in label
    resnet = row("resnet152", "frozen-linear", random=True)
    assert report.table.loc[resnet, GAIN] == pytest.approx((0.60 - 0.80) / 0.80 * 100)
    assert report.table.loc[resnet, AVERAGE] == pytest.approx(0.60) and report.differ == {}
    csv = pd.read_csv(report.files["csv"])
    assert csv.loc[csv["backbone"] == "resnet152", "inputs"].item() == "64 px, 3 channels, norm model, bilinear resize"
    assert csv.loc[csv["backbone"] == "deit", "inputs"].item() == "64 px, 3 channels, norm model, bicubic resize"


def test_rows_fed_otherwise_in_what_the_study_fixes_are_marked_not_split(isolated_outputs):
    """--norm dataset (the grid's) against --norm model (by hand), or another image size: one column, the odd row marked."""
    ledger = Ledger()
    fed(ledger, "deit", 0.80)
    fed(ledger, "dinov2", 0.85)
    fed(ledger, "resnet152", 0.70, norm="dataset", interpolation="bilinear")
    fed(ledger, "dino", 0.75, size=112)
    report = make_report(ledger, out=isolated_outputs / "reports")
    (label,) = report.metrics
    resnet, dino, dinov2 = (row(b, "frozen-linear", random=True) for b in ("resnet152", "dino", "dinov2"))
    assert report.differ == {(resnet, label): "norm dataset", (dino, label): "112 px"}
    assert report.cell(resnet, label).endswith("(n=1, inputs)") and report.cell(dinov2, label) == "0.8500 (n=1)"
    assert np.isfinite(report.table.loc[resnet, GAIN])  # still compared, with the mark saying how
    assert any(line.startswith("inputs: the row's backbone was fed") for line in notes(report))
    csv = pd.read_csv(report.files["csv"])
    assert csv.loc[csv["backbone"] == "resnet152", "inputs_differ"].item() == f"{label}: norm dataset"


def test_one_benchmark_at_two_image_sizes_is_one_column_and_off_recipe(isolated_outputs):
    ledger = Ledger()
    for size, scores in ((224, (0.70, 0.80)), (112, (0.60, 0.66))):
        add(ledger, "deit", "linear", "aptos2019", scores[0], size=size, val=0.5 if size == 224 else 0.9)
        add(ledger, "dinov2", "linear", "aptos2019", scores[1], size=size, val=0.5 if size == 224 else 0.9)
    report = make_report(ledger)
    assert report.metrics == {"aptos2019": "quadratic_kappa"}  # two input sizes: two configurations of one cell
    assert report.table.loc[row("dinov2", "frozen-linear"), "aptos2019"] == pytest.approx(0.66)  # chosen by validation
    assert "112 px" in report.rows[row("dinov2", "frozen-linear")].recipe  # not the study's 224


def test_rows_without_a_recorded_identity_get_a_column_of_their_own(isolated_outputs):
    ledger = Ledger()
    add(ledger, "deit", "linear", "aptos2019", 0.70, named=False)  # an older ledger's row: the dataset name alone
    add(ledger, "deit", "linear", "aptos2019", 0.80)
    assert set(make_report(ledger).metrics) == {"aptos2019", "aptos2019 (settings not recorded)"}


def test_protocols_never_share_a_cell_and_each_row_of_the_studys_is_marked(ledger):
    add(ledger, "dinov2", "linear", "aptos2019", 0.10, val=0.99, protocol="study")  # best on val: would win a shared cell
    add(ledger, "dinov2", "linear", "isic2019", 0.20, protocol="study")
    add(ledger, "deit", "linear", "aptos2019", 0.05, protocol="study")
    add(ledger, "deit", "linear", "isic2019", 0.10, protocol="study")
    report = make_report(ledger)
    assert report.table.loc[row("dinov2", "frozen-linear"), "aptos2019"] == pytest.approx(0.80)
    study = row("dinov2", "frozen-linear", protocol="study")
    assert report.table.loc[study, "aptos2019"] == pytest.approx(0.10)
    assert report.rows[study].label == "dinov2 frozen-linear (study protocol)"
    assert report.table.loc[study, GAIN] == pytest.approx(((0.10 - 0.05) / 0.05 + (0.20 - 0.10) / 0.10) / 2 * 100)  # its own baseline


def test_deit_heads_on_imagenet_backbones_are_extensions_and_foundation_models_are_not(isolated_outputs):
    ledger = Ledger()
    for backbone in ("deit", "dino", "resnet152", "dinov2", "mybackbone"):
        add(ledger, backbone, "deit", "aptos2019", 0.5)
    rows = make_report(ledger).rows
    flagged = {key[0] for key, info in rows.items() if info.extension}
    assert flagged == {"deit", "dino", "resnet152", "mybackbone"}
    assert rows[row("deit", "frozen-deit")].label == "deit frozen-deit (extension)"


def test_off_recipe_runs_are_marked_and_their_recipe_written_in_the_csv(ledger, isolated_outputs):
    add(ledger, "openclip", "linear", "aptos2019", 0.7, epochs=30, size=112)
    add(ledger, "openclip", "linear", "isic2019", 0.6, epochs=30, size=112)
    report = make_report(ledger, out=isolated_outputs / "reports")
    key = row("openclip", "frozen-linear")
    assert report.rows[key].label == "openclip frozen-linear (off-recipe)"  # 112 px: the same datasets' columns, marked
    assert report.differ[(key, "aptos2019")] == "112 px"
    csv = pd.read_csv(report.files["csv"])
    assert csv[csv["row"] == report.rows[key].label].iloc[0]["recipe"] == "epochs 30; 112 px"
    assert "openclip frozen-linear: epochs 30, 112 px" in report.files["markdown"].read_text()


def test_recipe_departures_name_each_setting_that_differs_from_the_studys():
    record = RunRecord(stage="probe", scenario="frozen-deit", backbone="sam", dataset="demo", head="deit",
                       config={"epochs": 100, "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 32, "head_depth": 1,
                               "head_preset": "deit-t", "grad_clip": 1.0, "warmup_steps": None, "patience": None},
                       config_key="k", cache_fingerprint=None, seed=0, primary_metric="accuracy", val_score=0.5,
                       test_metrics={}, test_primary=0.5, backbone_random=False)
    assert recipe_departures(record) == ["lr 0.001", "batch 32", "head depth 1", "head deit-t"]


def test_seeds_are_counted_per_cell_and_a_forced_rerun_is_not_another_seed(isolated_outputs):
    ledger = Ledger()
    for seed in (0, 1, 2):
        add(ledger, "deit", "linear", "aptos2019", 0.7 + seed / 100, seed=seed)
    add(ledger, "deit", "linear", "aptos2019", 0.72)  # seed 0 again (`--force`): replaces its earlier row
    report = build_report(ledger.rows())
    assert report.seeds.loc[row("deit", "frozen-linear"), "aptos2019"] == 3
    assert report.table.loc[row("deit", "frozen-linear"), "aptos2019"] == pytest.approx((0.72 + 0.71 + 0.72) / 3)
    assert report.cell(row("deit", "frozen-linear"), "aptos2019") == "0.7167 (n=3)"


def test_a_run_whose_best_epoch_came_last_is_flagged_in_the_cell_csv_and_notes(ledger, isolated_outputs):
    add(ledger, "dinov2", "linear", "aptos2019", 0.85, val=0.9, lr=3e-4, late=True)
    report = make_report(ledger, out=isolated_outputs / "reports")
    key = row("dinov2", "frozen-linear")
    assert report.cell(key, "aptos2019") == "0.8500 (n=1, late)" and report.rows[key].late == ["aptos2019"]
    csv = pd.read_csv(report.files["csv"])
    assert csv[csv["row"] == report.rows[key].label].iloc[0]["late_best"] == "aptos2019"
    assert "raise --epochs" in report.files["markdown"].read_text()


def test_the_figure_labels_the_baseline_and_each_bar_and_explains_an_empty_plot(ledger, isolated_outputs):
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert "0.00 (baseline)" in report.figure_texts
    assert f"{report.table.loc[row('dinov2', 'frozen-linear'), GAIN]:+.2f}" in report.figure_texts
    lonely = Ledger(isolated_outputs / "other.sqlite")
    add(lonely, "sam", "linear", "aptos2019", 0.5)
    empty = make_report(lonely, out=isolated_outputs / "empty")
    assert empty.figure_texts == ["No gain to show: no deit linear run to compare with; train one (`probe run --backbone deit`)."]
    assert empty.files["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_gain_figure_lists_the_rows_without_a_gain_and_why(ledger, isolated_outputs):
    add(ledger, "dinov2", "linear", "aptos2019", 0.7, freeze="unfrozen")
    add(ledger, "dinov2", "linear", "isic2019", 0.7, freeze="unfrozen")
    report = make_report(ledger, out=isolated_outputs / "reports")
    assert gain_chart(report).title == "Relative gain over the ImageNet baseline, deit frozen-linear"
    assert "no gain: dinov2 unfrozen-linear (no deit unfrozen-linear row under protocol medfm)" in report.figure_texts
    assert ("no gain: sam frozen-deit (1/2 datasets), sam frozen-linear (RANDOM backbone, 1/2 datasets) (lacks 1 of 2 datasets; "
            "--partial compares the datasets it has)") in report.figure_texts
    shown = {report.rows[key].label for key in report.table[GAIN].dropna().index}
    for info in report.rows.values():  # every row is a bar or named under the legend: none vanishes
        assert info.label in shown or any(info.label in text for text in report.figure_texts if text.startswith("no gain: "))


def test_the_gain_figure_says_when_its_baseline_ran_with_random_weights(isolated_outputs):
    ledger = Ledger()
    for dataset in ("aptos2019", "isic2019"):
        add(ledger, "deit", "linear", dataset, 0.5, random=True)
        add(ledger, "dinov2", "linear", dataset, 0.6)
    title = gain_chart(make_report(ledger)).title
    assert title == ("Relative gain over deit frozen-linear (RANDOM backbone): a baseline with RANDOM weights, not ImageNet "
                     "pretraining") and "ImageNet baseline" not in title


def test_reports_of_other_options_leave_their_own_files_and_the_command_prints_each_path(ledger, isolated_outputs, monkeypatch):
    out = isolated_outputs / "reports"
    monkeypatch.setenv("COLUMNS", "400")  # a path on one line
    code, plain, err = run_main(main, ["report"], monkeypatch)
    assert code == 0, err
    code, partial, err = run_main(main, ["report", "--partial", "--dataset", "isic2019", "--dataset", "aptos2019"], monkeypatch)
    assert code == 0, err
    stem = "report-dataset-aptos2019-isic2019-partial"
    assert {p.name for p in out.iterdir()} == {f"{s}{suffix}" for s in ("report", stem) for suffix in (".csv", ".md", ".png", "-scores.png")}
    assert "1/2 datasets" in pd.read_csv(out / "report.csv").set_index("row").index[-1]  # the plain report, untouched
    assert pd.read_csv(out / "report.csv")[GAIN].isna().sum() == 2 and pd.read_csv(out / f"{stem}.csv")[GAIN].isna().sum() == 0
    said = partial.splitlines()
    assert all(f"{kind}: {out / name}" in said for kind, name in (("figure", f"{stem}.png"), ("scores", f"{stem}-scores.png"),
                                                                 ("csv", f"{stem}.csv"), ("markdown", f"{stem}.md")))
    assert f"figure: {out / 'report.png'}" in plain.splitlines()


def test_a_reports_file_name_holds_the_options_that_change_it_and_nothing_else():
    assert report_stem() == "report" and report_stem(ci=None, boot=500, boot_seed=3) == "report"  # --boot alone changes nothing
    assert report_stem(ci=95) == "report-ci95" and report_stem(ci=90, boot=200, boot_seed=2) == "report-ci90-boot200-bootseed2"
    assert report_stem(["isic2019", "aptos2019", "isic2019"]) == report_stem(["aptos2019", "isic2019"]) == "report-dataset-aptos2019-isic2019"
    assert report_stem(names={"csv:a1b2": "ward a/b"}) == "report-name-csv_a1b2=ward_a_b"  # safe in a file name
    long = report_stem([f"dataset{i:02d}" for i in range(40)])
    assert len(long) == MAX_STEM and long != report_stem([f"dataset{i:02d}" for i in range(41)])  # cut, told apart by a hash


def test_the_score_figure_shows_each_cell_with_its_interval_and_the_columns_test_rows(isolated_outputs):
    ledger, where = Ledger(), isolated_outputs / "runs"
    labels, logits = classified(120, 0)
    scored(ledger, where, "deit", labels, logits)
    scored(ledger, where, "dinov2", labels, classified(120, 1)[1])
    report = make_report(ledger, out=isolated_outputs / "reports", ci=95, boot=100)
    assert report.files["scores"].name == "report-ci95-boot100-scores.png" and report.files["figure"].name == "report-ci95-boot100.png"
    chart = score_chart(report)
    (panel,) = chart.panels
    assert panel.title == f"{report.columns[0].label}\nn = 120 test rows" and panel.metric == "accuracy"
    for row, value in zip(chart.rows, panel.values, strict=True):
        key = next(k for k, info in report.rows.items() if info.label == row.label)
        found = report.intervals[(key, report.columns[0].label)]
        assert (value.value, value.low, value.high) == (report.table.loc[key, report.columns[0].label], found.low, found.high)
    assert panel.title in report.score_texts and "whiskers: 95% bootstrap intervals over the test rows (seed-mean)." in report.score_texts


def test_heads_on_augmented_views_are_their_own_rows_compared_with_a_baseline_on_as_many_views(ledger):
    """A probe on 3 augmented cached views and one on the eval view are different protocols: never one cell."""
    for backbone, score in (("dinov2", 0.70), ("deit", 0.50)):
        record = add(ledger, backbone, "linear", "aptos2019", score, val=0.99, lr=1e-3)
        record.config["views"] = 3  # what `probe run --views 3` records
        with ledger._connect() as db:
            db.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(record.config), record.id))
    report = make_report(ledger, partial=True)
    views = row("dinov2", "frozen-linear", protocol="medfm, 3 augmented views")
    assert report.table.loc[row("dinov2", "frozen-linear"), "aptos2019"] == pytest.approx(0.80)  # the eval-view row as it was
    assert report.table.loc[views, "aptos2019"] == pytest.approx(0.70)
    assert report.rows[views].label.startswith("dinov2 frozen-linear (medfm, 3 augmented views")
    assert report.table.loc[views, GAIN] == pytest.approx((0.70 - 0.50) / 0.50 * 100)  # against deit on 3 views too


def test_the_csv_gives_each_cells_standard_deviation_over_its_seeds(ledger, isolated_outputs):
    csv = pd.read_csv(make_report(ledger, out=isolated_outputs / "reports").files["csv"])
    dinov2 = csv[csv["row"] == "dinov2 frozen-linear"].iloc[0]
    assert dinov2["isic2019 std"] == pytest.approx(np.std([0.60, 0.70], ddof=1), abs=1e-4)  # two seeds, n-1
    assert pd.isna(dinov2["aptos2019 std"])  # one seed: no spread to give


def scored(ledger: Ledger, where, backbone: str, labels: np.ndarray, logits: np.ndarray, seed: int = 0, task=MULTICLASS,
           order: np.ndarray | None = None, **kw) -> RunRecord:
    """A run with stored test predictions (rows in `order` when given) and the test score they give."""
    order = np.arange(len(labels)) if order is None else order
    run_dir = where / f"{backbone}-{seed}-{len(list(where.glob('*')))}"
    run_dir.mkdir(parents=True)
    ids = np.array([f"img{i:04d}" for i in range(len(labels))])
    save_predictions(run_dir, {"test": Predictions(ids[order], labels[order], logits[order].astype(np.float32))})
    test = compute_metrics(task, labels, logits)[task.primary_metric]
    return add(ledger, backbone, "linear", "csv", test, seed=seed, metric=task.primary_metric, run_dir=str(run_dir), **kw)


def classified(n: int, seed: int, signal: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    return y, rng.normal(size=(n, 4)) + signal * np.eye(4)[y]


def test_intervals_are_over_the_seed_mean_and_gains_are_paired_with_the_baseline_on_the_same_resamples(isolated_outputs, monkeypatch):
    """deit and dinov2 seed 0 have the same logits, dinov2's seed 1 too (stored in another row order): every cell is
    scored on the same resamples of the same rows, so the cells' intervals are equal and the gain's is exactly [0, 0]
    (unpaired resamples would spread it); sam's other logits give an interval of its own around its score."""
    ledger, where = Ledger(), isolated_outputs / "runs"
    labels, logits = classified(400, 0)
    scored(ledger, where, "deit", labels, logits)
    scored(ledger, where, "dinov2", labels, logits, seed=0)
    scored(ledger, where, "dinov2", labels, logits, seed=1, order=np.random.default_rng(5).permutation(400))
    sam = scored(ledger, where, "sam", labels, classified(400, 1, signal=0.5)[1])
    report = make_report(ledger, out=isolated_outputs / "reports", ci=95, boot=300, boot_seed=2)
    deit, dinov2, sam_key = row("deit", "frozen-linear"), row("dinov2", "frozen-linear"), row("sam", "frozen-linear")
    label = report.columns[0].label  # the one column, `csv:<tag>`
    assert report.intervals[(dinov2, label)] == report.intervals[(deit, label)]
    assert report.intervals[(dinov2, GAIN)].low == 0 and report.intervals[(dinov2, GAIN)].high == 0
    found = report.intervals[(sam_key, label)]
    assert found.low < sam.test_primary < found.high and found.resamples == 300 and found.nan_resamples == 0
    gain = report.intervals[(sam_key, GAIN)]
    assert gain.low < report.table.loc[sam_key, GAIN] < gain.high
    assert report.cell(dinov2, label) == f"{report.table.loc[dinov2, label]:.4f} [{found_text(report, dinov2, label)}] (n=2)"
    markdown = report.files["markdown"].read_text()
    assert "95% percentile bootstrap interval over 300 resamples" in markdown and report.cell(sam_key, label) in markdown
    csv = pd.read_csv(report.files["csv"])
    line = csv[csv["row"] == "sam frozen-linear"].iloc[0]
    assert line[f"{label} ci low"] == pytest.approx(found.low, abs=1e-4) and line[f"{label} nan resamples"] == 0
    assert line[f"{GAIN} ci high"] == pytest.approx(gain.high, abs=1e-4) and f"{AVERAGE} ci low" in csv.columns
    assert "error bars: 95% bootstrap intervals, paired with the baseline" in report.figure_texts
    monkeypatch.setattr("scoring.bootstrap.BLOCK_ELEMENTS", 400 * 50)  # blocks of 50 resamples, shared by two processes
    assert make_report(ledger, ci=95, boot=300, boot_seed=2, jobs=2).intervals == report.intervals  # the same resamples
    other = make_report(ledger, ci=95, boot=300, boot_seed=3)
    assert other.intervals[(sam_key, label)] != found


def found_text(report, key, label) -> str:
    found = report.intervals[(key, label)]
    return f"{found.low:.4f}, {found.high:.4f}"


def test_resamples_where_the_metric_is_undefined_are_counted_in_the_notes_and_csv(isolated_outputs):
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 3), dtype=np.float32)
    labels[rng.random(60) < 0.5, 0] = 1
    labels[rng.random(60) < 0.5, 1] = 1
    labels[0, 2] = 1  # one positive of label z: lost by about a third of the plain resamples
    ledger, where = Ledger(), isolated_outputs / "runs"
    scored(ledger, where, "deit", labels, rng.normal(size=(60, 3)) + labels, task=MULTILABEL)
    report = make_report(ledger, out=isolated_outputs / "reports", ci=90, boot=200)
    found = report.intervals[(row("deit", "frozen-linear"), report.columns[0].label)]
    assert 40 < found.nan_resamples < 100 and np.isfinite(found.low)
    assert (f"deit frozen-linear, {report.columns[0].label}: the metric is undefined on {found.nan_resamples} of 200 resamples"
            in report.files["markdown"].read_text())


def test_an_interval_of_a_run_without_stored_predictions_is_one_error_saying_to_retrain(isolated_outputs):
    ledger, where = Ledger(), isolated_outputs / "runs"
    labels, logits = classified(40, 0)
    scored(ledger, where, "deit", labels, logits)
    add(ledger, "dinov2", "linear", "csv", 0.5, metric="accuracy", run_dir=str(where / "old-run"))  # a run of medfm 0.1
    with pytest.raises(MedfmError, match=r"no interval for dinov2 frozen-linear on csv:\w+: .*old-run.* predictions.* retrain .*with --force"):
        make_report(ledger, out=isolated_outputs / "reports", ci=95, boot=10)
    assert not (isolated_outputs / "reports").exists()  # nothing written
    assert make_report(ledger).table.loc[row("dinov2", "frozen-linear")].notna().any()  # without --ci the report is as before


def test_label_efficiency_runs_stay_out_of_the_report(ledger):
    """`probe curve`'s subset heads are not the cell's configurations: a lucky 5 % subset never wins a cell."""
    record = add(ledger, "dinov2", "linear", "aptos2019", 0.99, val=0.999, lr=3e-3)
    record.config["train_subset"] = {"kind": "fraction", "amount": 0.05, "repeat": 0, "seed": 0}
    with ledger._connect() as db:
        db.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(record.config), record.id))
    assert make_report(ledger).table.loc[row("dinov2", "frozen-linear"), "aptos2019"] == pytest.approx(0.80)
