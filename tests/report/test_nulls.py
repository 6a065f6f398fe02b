"""Null backbones (`grid run --null K`): runs on random-weight draws of a backbone are each cell's null, never rows; a
cell that does not beat them is marked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ledger.store import Ledger
from probe.cli import main
from report.table import build_report
from tests.ledgers import train
from tests.probe.caches import make_cache
from tests.tiny import run_main


def cache(root: Path, backbone: str, name: str, *, seed: int, separation: float, random: bool, draw: int = 0) -> Path:
    weights = {"kind": "random", **({"seed": draw} if draw else {})} if random else {"kind": "pretrained"}
    return make_cache(root / "features" / backbone / f"demo-{name}.h5", backbone=backbone, tokens=None, seed=seed,
                      separation=separation, random_weights=random, weights=weights,
                      settings={"backbone": backbone, "weights": weights})  # the fingerprint: each cache its own


def test_random_cells_are_not_above_their_null_and_a_better_backbone_is(isolated_outputs: Path, monkeypatch) -> None:
    weak = dict(separation=0.3, random=True)
    train(cache(isolated_outputs, "deit", "aaaaaaaaaaaa", seed=5, **weak))  # the random row: draw 0
    for draw, seed in ((1, 5), (2, 6), (3, 7)):  # draw 1 holds the very features of draw 0: the row cannot beat it
        train(cache(isolated_outputs, "deit", f"{draw}bbbbbbbbbbb", seed=seed, draw=draw, **weak))
        train(cache(isolated_outputs, "dinov2", f"{draw}ccccccccccc", seed=seed, draw=draw, **weak))
    train(cache(isolated_outputs, "dinov2", "dddddddddddd", seed=9, separation=4.0, random=False))  # deliberately better
    report = build_report(Ledger().rows())
    assert len(report.table) == 2  # the null draws are no rows
    rows = {key[0]: key for key in report.table.index}
    label = report.columns[0].label
    assert len(report.nulls[(rows["deit"], label)]) == 3 and len(report.nulls[(rows["dinov2"], label)]) == 3
    assert report.above_null(rows["deit"], label) is False and "not above null" in report.cell(rows["deit"], label)
    assert report.above_null(rows["dinov2"], label) is True and "null" not in report.cell(rows["dinov2"], label)
    code, out, err = run_main(main, ["report"], monkeypatch)
    assert code == 0, err
    assert "not above null: the cell's score" in " ".join(out.split())
    csv = pd.read_csv(isolated_outputs / "reports" / "report.csv").set_index("backbone")
    assert not csv.loc["deit", f"{label} above null"] and csv.loc["dinov2", f"{label} above null"]
    assert csv.loc["deit", f"{label} null best"] >= csv.loc["deit", f"{label} (accuracy)"]


def test_rows_are_grouped_by_backbone_set_then_ordered_by_gain_within_it(isolated_outputs: Path) -> None:
    for i, (backbone, separation) in enumerate((("rad_dino", 4.0), ("deit", 1.0), ("timm:vit_small_patch16_224", 3.0),
                                                 ("dinov3", 0.5), ("dinov2", 2.0))):
        train(cache(isolated_outputs, backbone.replace(":", "_"), f"{i}eeeeeeeeeee", seed=i, separation=separation, random=False)
              if ":" not in backbone else make_cache(isolated_outputs / "features" / "x" / f"demo-{i}eeeeeeeeeee.h5", backbone=backbone,
                                                     tokens=None, seed=i, separation=separation, random_weights=False,
                                                     settings={"backbone": backbone}))
    report = build_report(Ledger().rows())
    order = [key[0] for key in report.table.index]
    assert order[:2] in (["deit", "dinov2"], ["dinov2", "deit"]) and order[2:] == ["dinov3", "rad_dino", "timm:vit_small_patch16_224"]
    csv = pd.read_csv(isolated_outputs / "reports" / "report.csv") if (isolated_outputs / "reports").exists() else None
    assert csv is None or list(csv["set"]) == ["study", "study", "2025", "medical", "other"]
