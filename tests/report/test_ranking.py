"""The ranking (`report/ranking.py`): rank intervals that cover the true rank at their stated rate, pair verdicts, and a
critical-difference diagram whose bars are the post-hoc test's groups."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from report.ranking import ALPHA, Ranking, draw_cd_diagram, rank_table
from scoring.bootstrap import resample_metric


def simulated(qualities: list[float], datasets: int, rows: int, boot: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of models of known `qualities` (the chance each test row is right) on `datasets` test sets of `rows`
    rows: the point scores [models, datasets] and their bootstrap resamples [models, datasets, boot] (shared resamples
    per dataset, as the report draws them)."""
    point = np.zeros((len(qualities), datasets))
    samples = np.zeros((len(qualities), datasets, boot))
    for d in range(datasets):
        labels = rng.integers(0, 2, rows)
        for m, q in enumerate(qualities):
            right = rng.random(rows) < q
            logits = np.eye(2)[np.where(right, labels, 1 - labels)].astype(np.float32)
            point[m, d] = right.mean()
            samples[m, d] = resample_metric("accuracy", labels, [logits], boot=boot, seed=0, stream=d)
    return point, samples


def test_rank_intervals_cover_the_true_rank_at_their_stated_rate() -> None:
    """Five models of known quality on four datasets, 60 simulated studies: the 90% interval of each model's mean rank
    holds its true rank (1 = best) in at least 90% of them (measured on 2026-12-07: 0.92 at 90%, 0.957 at 95%)."""
    rng = np.random.default_rng(0)
    qualities = [0.70, 0.72, 0.76, 0.80, 0.86]
    true_rank = {f"m{i}": len(qualities) - i for i in range(len(qualities))}
    covered = total = 0
    for _ in range(60):
        point, samples = simulated(qualities, datasets=4, rows=300, boot=200, rng=rng)
        table = rank_table([f"m{i}" for i in range(len(qualities))], list("ABCD"), point, samples, level=90)
        for name, row in table.iterrows():
            covered += row["rank low"] <= true_rank[name] <= row["rank high"]
            total += 1
    assert covered / total >= 0.90
    assert table.index[0] == "m4" and table.loc["m4", "P(best)"] > 0.9  # the best model ranks first, nearly surely


def test_a_reversed_interval_would_be_caught() -> None:
    """The same check fails for a ranking that ranks the worst first: the coverage test can fail."""
    rng = np.random.default_rng(1)
    point, samples = simulated([0.6, 0.9], datasets=3, rows=300, boot=100, rng=rng)
    table = rank_table(["worse", "better"], list("ABC"), point, samples, level=95)
    assert table.loc["better", "rank high"] == 1 and table.loc["worse", "rank low"] == 2
    assert table.loc["better", "P(best)"] == 1.0 and list(table["rank on A"]) == [1.0, 2.0]


def test_the_cd_diagram_bars_are_exactly_the_groups_the_posthoc_test_does_not_tell_apart(tmp_path) -> None:
    names = list("abcd")
    p = np.array([[1, .5, .01, .01], [.5, 1, .2, .01], [.01, .2, 1, .3], [.01, .01, .3, 1]])
    posthoc = pd.DataFrame(p, index=names, columns=names)
    table = pd.DataFrame({"mean rank": [1.2, 1.9, 3.0, 3.9]}, index=pd.Index(names, name="row"))
    ranking = Ranking(table, pd.DataFrame(), posthoc, (9.0, 0.01), 95, 100, 0.01)
    elements = draw_cd_diagram(ranking, tmp_path / "cd.png")
    assert (tmp_path / "cd.png").stat().st_size > 0
    rank = table["mean rank"]
    groups = []
    for [line] in elements["crossbars"]:
        low, high = min(line.get_xdata()), max(line.get_xdata())
        groups.append({n for n in names if low - 1e-9 <= rank[n] <= high + 1e-9})
    for group in groups:  # every bar joins rows that no test separates
        assert all(posthoc.loc[a, b] >= ALPHA for a, b in itertools.combinations(group, 2)), group
    for a, b in itertools.combinations(names, 2):  # and every pair not separated shares a bar
        if posthoc.loc[a, b] >= ALPHA:
            assert any({a, b} <= g for g in groups), (a, b)


@pytest.mark.parametrize("margin, verdict", [(0.02, "equivalent"), (0.001, "underpowered")])
def test_a_pair_that_no_test_separates_is_equivalent_within_a_wide_margin_else_underpowered(margin, verdict) -> None:
    """Backbones a and b agree on all but 20 of 1000 test rows per dataset (10 each way); c is far better."""
    from report.ranking import _pairs

    rng = np.random.default_rng(2)
    point, samples = np.zeros((3, 2)), np.zeros((3, 2, 200))
    for d in range(2):
        labels = rng.integers(0, 2, 1000)
        right = {"a": rng.random(1000) < 0.8, "c": rng.random(1000) < 0.95}
        flips = np.concatenate([rng.choice(np.flatnonzero(right["a"]), 10, replace=False),
                                rng.choice(np.flatnonzero(~right["a"]), 10, replace=False)])
        right["b"] = right["a"].copy()
        right["b"][flips] = ~right["b"][flips]
        for m, name in enumerate("abc"):
            logits = np.eye(2)[np.where(right[name], labels, 1 - labels)].astype(np.float32)
            point[m, d] = right[name].mean()
            samples[m, d] = resample_metric("accuracy", labels, [logits], boot=200, seed=0, stream=d)
    pairs = _pairs(["a", "b", "c"], point, samples, 95, margin)
    same = pairs[(pairs["row a"] == "a") & (pairs["row b"] == "b")].iloc[0]
    assert same["difference"] == 0 and same["verdict"] == verdict and 0 < same["detectable"] < 0.02
    apart = pairs[(pairs["row a"] == "a") & (pairs["row b"] == "c")].iloc[0]
    assert apart["verdict"] == "worse" and apart["losses"] == 2 and apart["wins"] == 0


def test_probe_report_rank_prints_and_writes_the_ranking_and_refuses_a_single_row(isolated_outputs, monkeypatch) -> None:
    from probe.cli import main
    from tests.ledgers import train
    from tests.probe.caches import make_cache
    from tests.tiny import run_main

    def cache(backbone: str, dataset: str, separation: float):
        seed = {"demo": 1, "other": 2}[dataset]  # one dataset's caches share their test rows and labels
        return make_cache(isolated_outputs / "features" / backbone / f"{dataset}-{backbone[:4]}aaaaaaaa.h5", backbone=backbone,
                          dataset=dataset, tokens=None, seed=seed, separation=separation, random_weights=False,
                          settings={"backbone": backbone, "dataset": dataset})

    train(cache("deit", "demo", 0.5))
    code, _, err = run_main(main, ["report", "--rank"], monkeypatch)
    assert code == 2 and "a ranking needs at least two rows" in err and len(err.strip().splitlines()) == 1
    for backbone, separation in (("dinov2", 3.0), ("sam", 1.5)):
        train(cache(backbone, "demo", separation))
        train(cache(backbone, "other", separation))
    train(cache("deit", "other", 0.5))
    code, out, err = run_main(main, ["report", "--rank", "--boot", "200", "--ci", "95"], monkeypatch)
    assert code == 0, err
    said = " ".join(out.split())
    assert "ranking (1 = best)" in said and "Friedman test over the datasets" in said
    ranking = pd.read_csv(isolated_outputs / "reports" / "report-ci95-boot200_ranking.csv")
    assert ranking["row"].str.startswith("dinov2").iloc[0] and len(ranking) == 3
    assert (isolated_outputs / "reports" / "report-ci95-boot200_ranking_cd.png").exists()
