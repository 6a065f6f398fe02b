"""`make paper PROTOCOL=study` gives the study's figure: every one of its 32 rows (8 backbones x 4 scenarios) has a gain,
the frozen-DeiT rows (trained end to end on live images) included, compared with the frozen-linear baseline trained on
cached augmented views: one setting, however each was computed (`ledger.records.RunRecord.protocol`)."""

from __future__ import annotations

import math

import pytest

from common.study import STUDY_BACKBONES, STUDY_DATASETS
from grid.plan import SCENARIOS, GridSpec
from ledger.records import RunRecord
from ledger.store import Ledger
from report.table import GAIN, make_report
from tests.ledgers import identity

METRIC = {"aptos2019": "quadratic_kappa", "isic2019": "macro_recall", "ddsm": "accuracy", "chexpert": "mean_roc_auc"}


def study_ledger(path) -> Ledger:
    """The rows the grid's study protocol writes: frozen-linear heads by `probe sweep --protocol study --views 100` on
    the cache, every other cell by `finetune run --protocol study` (frozen-DeiT with --freeze all)."""
    spec, ledger = GridSpec(), Ledger(path)
    for n, cell in enumerate(spec.cells()):
        on_cache = spec.on_cache(cell)
        config = {"protocol": "study", "epochs": spec.epochs, "lr": 1e-4,
                  **({"views": spec.epochs, "feature": "pooled"} if on_cache else {"freeze": cell.scenario.split("-")[0]})}
        score = 0.5 + 0.001 * n
        ledger.add(RunRecord(
            stage="probe" if on_cache else "finetune", scenario=cell.scenario, backbone=cell.backbone, dataset=cell.dataset,
            head=cell.scenario.split("-")[1], config=config, config_key=f"{cell}", cache_fingerprint="f" if on_cache else None,
            seed=cell.seed, primary_metric=METRIC[cell.dataset], val_score=score, test_metrics={METRIC[cell.dataset]: score},
            test_primary=score, backbone_random=False,
        ).with_identity(identity(cell.dataset)))
    return ledger


def test_every_row_of_the_study_grid_has_a_gain_the_frozen_deit_rows_included(tmp_path) -> None:
    report = make_report(study_ledger(tmp_path / "results.sqlite"))
    table = report.table
    assert len(table) == len(STUDY_BACKBONES) * len(SCENARIOS) == 32
    assert set(table.columns) >= set(STUDY_DATASETS)
    missing = [report.rows[key].label for key in table.index if not math.isfinite(table.loc[key, GAIN])]
    assert missing == []
    frozen_deit = [key for key in table.index if key[1] == "frozen-deit"]
    assert {key[2] for key in frozen_deit} == {"finetune"} and {key[5] for key in table.index} == {"study"}
    sam = next(key for key in frozen_deit if key[0] == "sam")
    baseline = next(key for key in table.index if key[0] == "deit" and key[1] == "frozen-linear")
    assert baseline[2] == "probe"  # the baseline came from the cached views, the row from live images: one setting
    expected = sum((table.loc[sam, d] - table.loc[baseline, d]) / table.loc[baseline, d] for d in STUDY_DATASETS) / 4 * 100
    assert table.loc[sam, GAIN] == pytest.approx(expected)


def test_heads_on_views_under_medfm_stay_a_setting_of_their_own() -> None:
    record = RunRecord(stage="probe", scenario="frozen-linear", backbone="deit", dataset="demo", head="linear",
                       config={"protocol": "medfm", "views": 3}, config_key="k", cache_fingerprint="f", seed=0,
                       primary_metric="accuracy", val_score=0.5, test_metrics={}, test_primary=0.5, backbone_random=False)
    assert (record.protocol, record.computed) == ("medfm, 3 augmented views", "3 cached augmented views")
    record.config["protocol"] = "study"
    assert (record.protocol, record.computed) == ("study", "3 cached augmented views")
