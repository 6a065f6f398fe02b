"""`probe curve`: label efficiency, the test score of heads trained on growing labelled subsets of the train split.

A subset (`Subset`) is a fraction of each class's train rows, or a number of rows per class (shots), drawn for repeat
r from a seed. Each train row gets a rank from a hash of (seed, repeat, its id), and a class's subset is its
lowest-ranked rows, so the draw depends on the ids alone (not on the file's row order), is stratified (every class
keeps its share, at least one row), and is nested: within a repeat each smaller subset lies inside every larger one.

Every head trains in the batched sweep path (`probe.sweep.run_sweep`) from one open cache: the subset travels in
`TrainConfig.train_subset`, so it is part of the run's ledger key, and a rerun trains nothing. Repeat r also seeds the
head with r; the fraction 1 is the whole train split, with no subset in its config: those are plain runs, which
`probe run --seed r` and `probe sweep` share.

Which configuration a curve trains (`curve_config`) is said for every cache: the options given on the command line
when any was; else the one `probe report` chose for this backbone and head on this cache (the best mean validation
score), when the ledger has one; else the default recipe. A curve compares backbones on one test set: caches whose test
rows differ are refused (`check_test_sets`) unless the caller allows it, and train rows are never averaged across caches.
The figure draws the metric's chance level and the train rows of each point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rich.console import Console

from cache.store import CacheReader
from common.errors import MedfmError
from ledger.records import RunRecord, best_configuration, mean_score
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.data import feature_name
from probe.heads import get_head
from probe.subsets import Subset, subset_rows
from scoring.health import chance_level

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def subset_config(base: TrainConfig, subset: Subset) -> TrainConfig:
    """The config of one curve point: the head seeded by the repeat; the whole split (a fraction of 1) is a plain run."""
    whole = subset.kind == "fraction" and subset.amount == 1.0
    return replace(base, seed=base.seed + subset.repeat, train_subset=None if whole else subset)


@dataclass
class CurvePoint:
    backbone: str  # the row label: the backbone, marked RANDOM for untrained weights
    subset: Subset
    train_rows: int
    record: RunRecord


@dataclass
class CurveOutcome:
    points: list[CurvePoint]
    metric: str
    dataset: str
    kind: str
    chance: dict[str, float] = field(default_factory=dict)  # row label -> the metric's chance level on its cache's test rows
    test_rows: dict[str, int] = field(default_factory=dict)  # row label -> its cache's test rows
    mixed: bool = False  # the caches' test sets differ (allowed by the caller)
    trained: int = 0
    skipped: int = 0
    train_passes: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One line per (amount, backbone): mean, min, max and std of the test metric over repeats, the train rows (one
        cache's: the repeats of an amount draw as many), its cache's test rows and the metric's chance level on them."""
        lines = []
        frame = pd.DataFrame([{"backbone": p.backbone, "amount": p.subset.amount, "score": p.record.test_primary,
                               "train_rows": p.train_rows} for p in self.points])
        for (amount, backbone), group in frame.groupby(["amount", "backbone"], sort=False):
            scores = [s for s in group["score"] if s is not None and math.isfinite(s)]
            lines.append({self.kind: amount, "backbone": backbone, "dataset": self.dataset, "metric": self.metric,
                          "mean": mean_score(scores), "min": min(scores, default=math.nan), "max": max(scores, default=math.nan),
                          "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan, "repeats": len(group),
                          "train_rows": int(round(group["train_rows"].mean())), "test_rows": self.test_rows[backbone],
                          "chance": self.chance[backbone]})
        return pd.DataFrame(lines).sort_values([self.kind], kind="stable").reset_index(drop=True)


def run_curve(
    readers: Sequence[CacheReader], options: TrainConfig, kind: str, amounts: Sequence[float], repeats: int, *, layer: int | None = None,
    given: Sequence[str] = (), allow_mixed_test_sets: bool = False, subset_seed: int = 0, device: str = "auto",
    max_ram: int | None = None, ledger: Ledger | None = None, console: Console | None = None,
) -> CurveOutcome:
    """Train the curve's heads on each open cache (one sweep per cache, in the configuration `curve_config` says),
    skipping those the ledger holds; caches with different test sets are refused unless `allow_mixed_test_sets`."""
    from probe.sweep import run_sweep  # the sweep imports this module for `subset_rows`

    console = console or Console(stderr=True)
    if repeats < 1:
        raise MedfmError(f"--repeats must be at least 1, got {repeats}")
    if not amounts:
        raise MedfmError(f"--{'fractions' if kind == 'fraction' else 'shots'} needs at least one value")
    subsets = [Subset(kind, amount, r, subset_seed) for amount in dict.fromkeys(amounts) for r in range(repeats)]
    metrics = {reader.task.primary_metric for reader in readers}
    if len(metrics) != 1:
        raise MedfmError(f"the caches score different metrics ({', '.join(sorted(metrics))}); draw one curve per dataset")
    mixed = check_test_sets(readers, allow_mixed_test_sets)
    ledger = ledger or Ledger()
    labels = _labels(readers)
    outcome = CurveOutcome([], metrics.pop(), readers[0].meta.dataset.name, kind, mixed=mixed)
    plans = []
    for reader, label in zip(readers, labels, strict=True):  # every subset drawn before anything trains: a class too small stops here
        rows = {s: len(subset_rows(reader, s)) for s in subsets}
        config, why = curve_config(reader, options, layer, given, ledger)
        plans.append((reader, [subset_config(config, s) for s in subsets], rows, why))
        outcome.chance[label] = chance_level(outcome.metric, reader.labels("test"))
        outcome.test_rows[label] = len(reader.ids("test"))
    for (reader, configs, rows, why), label in zip(plans, labels, strict=True):
        console.print(f"{label}: {why}", highlight=False, soft_wrap=True)
        console.print(f"{label}: {len(subsets)} heads ({len(subsets) // repeats} {kind} x {repeats} repeats) on {reader.path.name}")
        swept = run_sweep(reader, configs, device=device, max_ram=max_ram, ledger=ledger, console=console)
        outcome.trained, outcome.skipped = outcome.trained + swept.trained, outcome.skipped + swept.skipped
        outcome.train_passes += swept.train_passes
        outcome.points += [CurvePoint(label, s, rows[s], r) for s, r in zip(subsets, swept.records, strict=True)]
    return outcome


def check_test_sets(readers: Sequence[CacheReader], allow: bool) -> bool:
    """Whether the caches' test sets differ (their valid test ids, or an id's label); refused in one line unless `allow`,
    because curves on different test rows are not one comparison."""
    ids, labels = _test_set(readers[0])
    for reader in readers[1:]:
        other_ids, other_labels = _test_set(reader)
        if np.array_equal(ids, other_ids) and np.array_equal(labels, other_labels, equal_nan=labels.dtype.kind == "f"):
            continue
        if not allow:
            how = (f"the same {len(ids)} ids, labelled otherwise" if np.array_equal(ids, other_ids) else
                   f"{len(ids)} and {len(other_ids)} test rows, {len(np.intersect1d(ids, other_ids))} ids shared")
            raise MedfmError(f"{readers[0].path.name} and {reader.path.name} hold different test sets ({how}): one curve compares "
                             "backbones on the same rows; draw one curve per test set, or pass --allow-mixed-test-sets")
        return True
    return False


def _test_set(reader: CacheReader) -> tuple[np.ndarray, np.ndarray]:
    """The cache's valid test ids, sorted, and their labels."""
    ids = reader.ids("test")
    order = np.argsort(ids, kind="stable")
    return ids[order], reader.labels("test")[order]


def curve_config(reader: CacheReader, options: TrainConfig, layer: int | None, given: Sequence[str],
                 ledger: Ledger) -> tuple[TrainConfig, str]:
    """The configuration a cache's curve trains, and a line saying which and why: `options` at block `layer` when any
    training option was `given` on the command line; else the configuration `probe report` chose for this backbone and
    head on this cache, when the ledger has one; else `options` (the default recipe)."""
    scenario = f"frozen-{options.head}"
    plain = replace(options, feature=feature_name(reader, get_head(options.head).reads, layer))
    if given:
        return plain, f"the options given ({', '.join(given)}), not the report's choice: {describe(plain)}"
    chosen = chosen_runs(ledger, reader, scenario)
    if not chosen:
        return plain, (f"the ledger holds no {scenario} run on this cache, so the default recipe: {describe(plain)} (train a "
                       "`probe sweep` first to draw the curve of a tuned head)")
    config = from_record(chosen[0])
    runs = ", ".join(str(r.id) for r in chosen)
    return config, (f"the configuration `probe report` chose for {scenario} on this cache (runs {runs}, best mean validation "
                    f"{mean_score([r.val_score for r in chosen]):.4f}): {describe(config)}")


def chosen_runs(ledger: Ledger, reader: CacheReader, scenario: str) -> list[RunRecord]:
    """The seeds of the best configuration by mean validation (the report's rule) among the ledger's whole-split runs of
    this scenario on this cache, of medfm's protocol when there are some, else of the first other protocol by name."""
    runs = [r for r in ledger.rows(backbone=reader.meta.backbone.name, scenario=scenario, stage="probe")
            if r.cache_fingerprint == reader.fingerprint and not r.config.get("train_subset")]
    protocols = sorted({r.protocol for r in runs}, key=lambda p: (p != TrainConfig.protocol, p))
    return best_configuration([r for r in runs if r.protocol == protocols[0]]) if protocols else []


def from_record(record: RunRecord) -> TrainConfig:
    """The training settings a ledger row records (`TrainConfig.to_dict`), seed 0 and every train row."""
    names = {f.name for f in fields(TrainConfig)} - {"seed", "train_subset"}
    settings = {k: v for k, v in record.config.items() if k in names}
    settings.setdefault("solver", "adamw")  # an AdamW run records no solver
    if "c_grid" in settings:
        settings["c_grid"] = tuple(settings["c_grid"])
    return TrainConfig(**settings)


def describe(config: TrainConfig) -> str:
    """`linear head on pooled, L-BFGS logistic regression (C on validation)` or its AdamW recipe."""
    c = config.resolved()
    fit = ("L-BFGS logistic regression (C on validation)" if c.solver == "lbfgs" else
           f"AdamW lr {c.lr:g}, weight decay {c.weight_decay:g}, {c.epochs} epochs, batch {c.batch_size}"
           + (f", {c.views} augmented views" if c.views else "") + (", standardized" if c.standardize else ""))
    return f"{c.head} head on {c.feature}, {fit}" + (f", protocol {c.protocol}" if c.protocol != TrainConfig.protocol else "")


def _labels(readers: Sequence[CacheReader]) -> list[str]:
    """Each cache's row label: its backbone (RANDOM when untrained), with the file's name when a backbone comes twice."""
    names = [r.meta.backbone.name + (" (RANDOM)" if r.meta.backbone.random_weights else "") for r in readers]
    return [f"{n} [{r.path.stem}]" if names.count(n) > 1 else n for n, r in zip(names, readers, strict=True)]


def write_curve(outcome: CurveOutcome, out: Path) -> dict[str, Path]:
    """`curve.csv` (the table, one line per amount and backbone) and `curve.png` (`curve_figure`) into `out`."""
    from report.figures import save

    out.mkdir(parents=True, exist_ok=True)
    table = outcome.table()
    outcome.files["csv"] = out / "curve.csv"
    table.to_csv(outcome.files["csv"], index=False, float_format="%.4f")
    outcome.files["figure"] = out / "curve.png"
    save(curve_figure(outcome, table), outcome.files["figure"])
    return outcome.files


def curve_figure(outcome: CurveOutcome, table: pd.DataFrame) -> Figure:
    """The metric against the labelled amount per backbone (log x-axis): the mean as a line, the min-max over repeats as a
    band, the metric's chance level as a dotted line, and the train rows of each point: on a top axis when every backbone
    has as many at each amount, else beside each point."""
    import matplotlib.pyplot as plt

    from report.figures import MARKERS, OKABE_ITO

    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    shared = bool(len(table)) and table.groupby(outcome.kind)["train_rows"].nunique().max() == 1
    for i, (backbone, group) in enumerate(table.groupby("backbone", sort=False)):
        x, shade = group[outcome.kind].to_numpy(dtype=float), OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(x, group["mean"], marker=MARKERS[i % len(MARKERS)], color=shade, label=backbone)
        ax.fill_between(x, group["min"], group["max"], color=shade, alpha=0.2)
        for amount, mean, rows in ([] if shared else zip(x, group["mean"], group["train_rows"], strict=True)):
            ax.annotate(f"{rows}", (amount, mean), xytext=(0, 6 + 8 * i), textcoords="offset points", ha="center", fontsize=7,
                        color=shade)  # stacked by backbone: close lines keep their counts apart
    _chance_lines(ax, outcome.chance)
    ax.set_xscale("log")
    amounts = sorted(set(table[outcome.kind]))
    ax.set_xticks(amounts, [f"{a:g}" for a in amounts])
    ax.minorticks_off()
    if shared:
        top = ax.secondary_xaxis("top")
        top.set_xticks(amounts, [str(n) for n in table.groupby(outcome.kind)["train_rows"].first().loc[amounts]], fontsize=8)
        top.minorticks_off()
        top.set_xlabel("train rows", fontsize=9)
    ax.set_xlabel("labelled fraction of the train split (log scale)" if outcome.kind == "fraction" else "labelled train rows per class (log scale)")
    ax.set_ylabel(f"test {outcome.metric}")
    repeats = int(table["repeats"].max()) if len(table) else 0
    mixed = "; the caches' test sets DIFFER" if outcome.mixed else ""
    rows = "" if shared else ", train rows beside each point"
    ax.set_title(f"Label efficiency on {outcome.dataset}: mean over {repeats} repeats, band min-max{rows}{mixed}", fontsize=10, wrap=True)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


def _chance_lines(ax: Axes, chance: dict[str, float]) -> None:
    """A dotted line at each distinct chance level, naming its backbones when the caches' levels differ."""
    levels: dict[float, list[str]] = {}
    for backbone, level in chance.items():
        levels.setdefault(level, []).append(backbone)
    for level, backbones in levels.items():
        owners = f", {', '.join(backbones)}" if len(levels) > 1 else ""
        ax.axhline(level, color="black", linestyle=":", linewidth=1, label=f"chance ({level:.3f}{owners})")
