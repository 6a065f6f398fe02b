"""The study's answer as a ranking, with its uncertainty: `probe report --rank`.

Rows (backbone x scenario) that have every dataset column are ranked per dataset by their cell's test score and by
their mean rank across datasets. The uncertainty comes from the same bootstrap as the report's intervals
(`scoring.bootstrap`): each dataset's test rows are resampled (every row scored on the same resamples, its seeds
averaged), the ranks are recomputed on every resample, and a row's rank interval and its probability of ranking first
are read off those resamples. Across datasets, scipy's Friedman test asks whether the rows differ at all, and
scikit-posthocs' Nemenyi post-hoc test which pairs do: its p-values draw the critical-difference diagram (rows joined
by a bar are not told apart). Each pair of rows gets a verdict from the paired bootstrap of its mean difference over
the datasets, Holm-corrected over all pairs (statsmodels): better, worse, equivalent (its interval inside the margin),
or underpowered, with the smallest difference these test sets could detect.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from common.errors import MedfmError
from report.table import DEFAULT_BOOT, Column, Report, replicate_predictions
from scoring.bootstrap import check_settings, resample_metric

ALPHA = 0.05
POWER = 0.8  # the detectable difference: the one a two-sided test at ALPHA finds with this probability
VERDICTS = ("better", "worse", "equivalent", "underpowered")


@dataclass
class Ranking:
    """Ranks of the report's complete rows, best first, with their bootstrap intervals and the tests across datasets."""

    table: pd.DataFrame  # index: row label; mean rank, its interval, P(best), then the rank on each dataset
    pairs: pd.DataFrame  # one line per pair: mean difference, interval, p (Holm), wins/ties/losses over datasets, verdict
    posthoc: pd.DataFrame | None  # Nemenyi p-values between rows (None with fewer than 3 rows or 2 datasets)
    friedman: tuple[float, float] | None  # (statistic, p) over the datasets, or None as above
    level: float
    boot: int
    margin: float
    notes: list[str] = field(default_factory=list)


def rank_report(report: Report, *, level: float = 95, boot: int = 1000, seed: int = 0, margin: float = 0.01,
                jobs: int = 1) -> Ranking:
    """The ranking of `report`'s rows that have a cell in every column (a row missing a dataset cannot be ranked on it)."""
    check_settings(level, boot, jobs, seed)
    if not 0 <= margin < math.inf:
        raise MedfmError(f"--margin is the largest difference called equivalent, a non-negative number; got {margin:g}")
    labels = [c.label for c in report.columns]
    keys = [k for k in report.table.index if all(math.isfinite(report.table.loc[k, d]) for d in labels)]
    if len(keys) < 2:
        raise MedfmError(f"a ranking needs at least two rows with a score on every dataset; the report has {len(keys)}"
                         + ("" if len(keys) == len(report.table.index) else " (rows missing a dataset are left out)")
                         + "; train another backbone or scenario on the same datasets")
    names = [report.rows[k].label for k in keys]
    point = report.table.loc[keys, labels].to_numpy(dtype=float)  # [rows, datasets]
    samples = np.stack([column_samples(report, keys, column, boot, seed, jobs) for column in report.columns], axis=1)  # [rows, datasets, boot]
    table = rank_table(names, labels, point, samples, level)
    friedman, posthoc = _friedman(names, point)
    pairs = _pairs(names, point, samples, level, margin)
    notes = [f"ranks: 1 is best, per dataset by the cell's test score (ties share their mean rank), then averaged over "
             f"{len(labels)} dataset(s); [low, high]: {level:g}% percentile bootstrap interval of the mean rank over {boot} "
             f"resamples of each dataset's test rows (seed {seed}), ranks recomputed on every resample; P(best): the share of "
             "resamples where the row has the best mean rank."]
    if friedman is None:
        notes.append("Friedman and Nemenyi tests: need at least 3 rows and 2 datasets.")
    else:
        notes.append(f"Friedman test over the datasets: chi2 = {friedman[0]:.2f}, p = {friedman[1]:.3g} (scipy); pairs told "
                     f"apart by the Nemenyi post-hoc test (scikit-posthocs) at alpha {ALPHA} in the critical-difference diagram.")
    notes.append(f"pairs: paired bootstrap of the mean difference over datasets, p-values Holm-corrected over "
                 f"{len(pairs)} pairs (statsmodels); equivalent: the {level:g}% interval inside +-{margin:g}; underpowered: "
                 f"neither, with the smallest difference these test sets detect at alpha {ALPHA} with power {POWER}.")
    return Ranking(table, pairs, posthoc, friedman, level, boot, margin, notes)


def rank_and_write(report: Report, *, margin: float = 0.01, jobs: int = 1) -> Ranking:
    """The ranking of a written report's rows with the report's own interval settings (95%, DEFAULT_BOOT resamples when it
    has none), its files beside the report's (`<stem>_ranking.csv`, `_pairs.csv`, `_cd.png`) and among its files."""
    settings = report.bootstrap or {"level": 95, "boot": DEFAULT_BOOT, "seed": 0}
    ranking = rank_report(report, level=settings["level"], boot=settings["boot"], seed=settings["seed"], margin=margin, jobs=jobs)
    stem = report.files["csv"]
    files = write_ranking(ranking, stem.parent, f"{stem.stem}_ranking")
    report.files.update({name if name == "ranking" else f"ranking {name}": path for name, path in files.items()})
    return ranking


def rank_or_reason(report: Report, *, margin: float = 0.01, jobs: int = 1) -> Ranking | str:
    """`rank_and_write`, or why there is none (fewer than two complete rows, test rows that differ), so that a page or a
    LaTeX file still says it."""
    try:
        return rank_and_write(report, margin=margin, jobs=jobs)
    except MedfmError as err:
        return str(err)


def column_samples(report: Report, keys: list, column: Column, boot: int, seed: int, jobs: int) -> np.ndarray:
    """[rows, boot]: each row's metric on every resample of the column's test rows, its seeds averaged; the resamples are
    those of the report's intervals (same seed, the column's stream), shared by every row."""
    stream = int(hashlib.sha256(column.dataset_id.encode()).hexdigest()[:8], 16)
    out = []
    reference = None
    for key in keys:
        replicates = list(replicate_predictions(report.chosen[(key, column.label)], report.rows[key].label, column))
        ids, truth = replicates[0][0], replicates[0][1]
        if reference is None:
            reference = (report.rows[key].label, ids)
        elif not np.array_equal(ids, reference[1]):
            raise MedfmError(f"no ranking on {column.label}: the test rows of {report.rows[key].label} differ from those of "
                             f"{reference[0]}; cells of one column must share them")
        out.append(resample_metric(column.metric, truth, [r[2] for r in replicates], boot=boot, seed=seed, stream=stream, jobs=jobs))
    return np.stack(out)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (1 = the highest score), ties sharing their mean rank; NaN where a score is NaN."""
    return stats.rankdata(-scores, axis=0, nan_policy="omit")


def rank_table(names: list[str], labels: list[str], point: np.ndarray, samples: np.ndarray, level: float) -> pd.DataFrame:
    per_dataset = _ranks(point)  # [rows, datasets]
    defined = np.isfinite(samples).all(axis=(0, 1))  # resamples where every row has a score on every dataset
    mean_ranks = _ranks(samples[:, :, defined]).mean(axis=1)  # [rows, defined resamples]
    tail = (100 - level) / 2
    best = mean_ranks == mean_ranks.min(axis=0, keepdims=True)
    table = pd.DataFrame({
        "mean rank": per_dataset.mean(axis=1),
        "rank low": np.percentile(mean_ranks, tail, axis=1) if defined.any() else np.nan,
        "rank high": np.percentile(mean_ranks, 100 - tail, axis=1) if defined.any() else np.nan,
        "P(best)": (best / best.sum(axis=0, keepdims=True)).mean(axis=1) if defined.any() else np.nan,  # a tie shares it
        **{f"rank on {d}": per_dataset[:, i] for i, d in enumerate(labels)},
    }, index=pd.Index(names, name="row"))
    return table.sort_values(["mean rank", "P(best)"], ascending=[True, False])


def _friedman(names: list[str], point: np.ndarray) -> tuple[tuple[float, float] | None, pd.DataFrame | None]:
    """scipy's Friedman test (rows as treatments, datasets as blocks) and the Nemenyi post-hoc p-values."""
    if len(names) < 3 or point.shape[1] < 2:
        return None, None
    import scikit_posthocs as sp

    statistic, p = stats.friedmanchisquare(*point)
    posthoc = sp.posthoc_nemenyi_friedman(pd.DataFrame(point.T, columns=names))
    return (float(statistic), float(p)), posthoc


def _pairs(names: list[str], point: np.ndarray, samples: np.ndarray, level: float, margin: float) -> pd.DataFrame:
    """Every pair (a, b): the mean over datasets of a - b, its paired bootstrap interval and p-value (Holm over pairs),
    the datasets where a wins, ties or loses (per-dataset paired p, Holm over all pairs and datasets), and a verdict."""
    from statsmodels.stats.multitest import multipletests

    tail = (100 - level) / 2
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    lines, per_dataset = [], []
    for a, b in itertools.combinations(range(len(names)), 2):
        diff = samples[a] - samples[b]  # [datasets, boot]
        mean = diff.mean(axis=0)
        mean = mean[np.isfinite(mean)]
        lines.append({"row a": names[a], "row b": names[b], "difference": float((point[a] - point[b]).mean()),
                      "ci low": float(np.percentile(mean, tail)) if len(mean) else math.nan,
                      "ci high": float(np.percentile(mean, 100 - tail)) if len(mean) else math.nan,
                      "p": _p_value(mean), "detectable": float(z * mean.std(ddof=1)) if len(mean) > 1 else math.nan})
        per_dataset.append([_p_value(d[np.isfinite(d)]) for d in diff])
    pairs = pd.DataFrame(lines)
    pairs["p holm"] = multipletests(pairs["p"], method="holm")[1]
    flat = np.asarray(per_dataset)
    holm = multipletests(flat.ravel(), method="holm")[1].reshape(flat.shape)
    signs = np.sign(point[[a for a, _ in itertools.combinations(range(len(names)), 2)]]
                    - point[[b for _, b in itertools.combinations(range(len(names)), 2)]])
    pairs["wins"] = ((holm < ALPHA) & (signs > 0)).sum(axis=1)
    pairs["losses"] = ((holm < ALPHA) & (signs < 0)).sum(axis=1)
    pairs["ties"] = flat.shape[1] - pairs["wins"] - pairs["losses"]
    pairs["verdict"] = [_verdict(r, margin) for r in pairs.to_dict("records")]
    return pairs


def _p_value(values: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: twice the smaller tail, at least 1 / (resamples + 1)."""
    if not len(values):
        return math.nan
    tail = min((values <= 0).mean(), (values >= 0).mean())
    return float(min(1.0, max(2 * tail, 1 / (len(values) + 1))))


def _verdict(pair: dict, margin: float) -> str:
    """better or worse when the Holm-corrected test says so; equivalent when the interval lies within +-margin."""
    if pair["p holm"] < ALPHA:
        return "better" if pair["difference"] > 0 else "worse"
    if -margin <= pair["ci low"] and pair["ci high"] <= margin:
        return "equivalent"
    return "underpowered"


def write_ranking(ranking: Ranking, out: Path, name: str = "ranking") -> dict[str, Path]:
    """The ranking's CSVs (`<name>.csv`, `<name>_pairs.csv`) and its critical-difference diagram (`<name>_cd.png`)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"ranking": out / f"{name}.csv", "pairs": out / f"{name}_pairs.csv"}
    ranking.table.to_csv(files["ranking"], float_format="%.4f")
    ranking.pairs.to_csv(files["pairs"], index=False, float_format="%.4g")
    if ranking.posthoc is not None:
        files["diagram"] = out / f"{name}_cd.png"
        draw_cd_diagram(ranking, files["diagram"])
    return files


def draw_cd_diagram(ranking: Ranking, path: Path) -> dict[str, list]:
    """scikit-posthocs' critical-difference diagram of the mean ranks and the Nemenyi p-values; returns its elements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs as sp

    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.4 * len(ranking.table)), layout="constrained")  # room for the labels below
    elements = sp.critical_difference_diagram(ranking.table["mean rank"], ranking.posthoc, alpha=ALPHA, ax=ax)
    ax.set_title(f"mean rank over datasets (1 = best); a bar joins rows the Nemenyi test does not tell apart (alpha {ALPHA})",
                 fontsize=8)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return elements
