"""`probe curve`: label efficiency, the test score of heads trained on growing labelled subsets of the train split.

A subset (`Subset`) is a fraction of each class's train rows, or a number of rows per class (shots), drawn for repeat
r from a seed. Each train row gets a rank from a hash of (seed, repeat, its id), and a class's subset is its
lowest-ranked rows, so the draw depends on the ids alone (not on the file's row order), is stratified (every class
keeps its share, at least one row), and is nested: within a repeat each smaller subset lies inside every larger one.

Every head trains in the batched sweep path (`probe.sweep.run_sweep`) from one open cache: the subset travels in
`TrainConfig.train_subset`, so it is part of the run's ledger key, and a rerun trains nothing. Repeat r also seeds the
head with r; the fraction 1 is the whole train split, with no subset in its config: those are plain runs, which
`probe run --seed r` and `probe sweep` share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from cache.store import CacheReader
from common.errors import MedfmError
from ledger.records import RunRecord, mean_score
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.data import feature_name
from probe.heads import get_head
from probe.subsets import Subset, subset_rows


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
    trained: int = 0
    skipped: int = 0
    train_passes: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One line per (amount, backbone): mean, min, max and std of the test metric over repeats, and the train rows."""
        lines = []
        frame = pd.DataFrame([{"backbone": p.backbone, "amount": p.subset.amount, "score": p.record.test_primary,
                               "train_rows": p.train_rows} for p in self.points])
        for (amount, backbone), group in frame.groupby(["amount", "backbone"], sort=False):
            scores = [s for s in group["score"] if s is not None and math.isfinite(s)]
            lines.append({self.kind: amount, "backbone": backbone, "dataset": self.dataset, "metric": self.metric,
                          "mean": mean_score(scores), "min": min(scores, default=math.nan), "max": max(scores, default=math.nan),
                          "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else math.nan, "repeats": len(group),
                          "train_rows": int(round(group["train_rows"].mean()))})
        return pd.DataFrame(lines).sort_values([self.kind], kind="stable").reset_index(drop=True)


def run_curve(
    readers: Sequence[CacheReader], base: TrainConfig, kind: str, amounts: Sequence[float], repeats: int, *, layer: int | None = None,
    subset_seed: int = 0, device: str = "auto", max_ram: int | None = None, ledger: Ledger | None = None, console: Console | None = None,
) -> CurveOutcome:
    """Train the curve's heads on each open cache (one sweep per cache, `base` with the feature of `base.head` at block
    `layer`), skipping those the ledger holds."""
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
    plans = []
    for reader in readers:  # every subset drawn before anything trains: a class too small for the shots stops here
        rows = {s: len(subset_rows(reader, s)) for s in subsets}
        feature = feature_name(reader, get_head(base.head).reads, layer)
        plans.append((reader, [subset_config(replace(base, feature=feature), s) for s in subsets], rows))
    labels = _labels(readers)
    outcome = CurveOutcome([], metrics.pop(), readers[0].meta.dataset.name, kind)
    for (reader, configs, rows), label in zip(plans, labels, strict=True):
        console.print(f"{label}: {len(subsets)} heads ({len(subsets) // repeats} {kind} x {repeats} repeats) on {reader.path.name}")
        swept = run_sweep(reader, configs, device=device, max_ram=max_ram, ledger=ledger, console=console)
        outcome.trained, outcome.skipped = outcome.trained + swept.trained, outcome.skipped + swept.skipped
        outcome.train_passes += swept.train_passes
        outcome.points += [CurvePoint(label, s, rows[s], r) for s, r in zip(subsets, swept.records, strict=True)]
    return outcome


def _labels(readers: Sequence[CacheReader]) -> list[str]:
    """Each cache's row label: its backbone (RANDOM when untrained), with the file's name when a backbone comes twice."""
    names = [r.meta.backbone.name + (" (RANDOM)" if r.meta.backbone.random_weights else "") for r in readers]
    return [f"{n} [{r.path.stem}]" if names.count(n) > 1 else n for n, r in zip(names, readers, strict=True)]


def write_curve(outcome: CurveOutcome, out: Path) -> dict[str, Path]:
    """`curve.csv` (the table, one line per amount and backbone) and `curve.png` (the metric against the labelled amount
    per backbone, log x-axis, the mean as a line and the min-max over repeats as a band) into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    table = outcome.table()
    outcome.files["csv"] = out / "curve.csv"
    table.to_csv(outcome.files["csv"], index=False, float_format="%.4f")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backbone, group in table.groupby("backbone", sort=False):
        x = group[outcome.kind].to_numpy(dtype=float)
        line = ax.plot(x, group["mean"], marker="o", label=backbone)[0]
        ax.fill_between(x, group["min"], group["max"], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of the train split (log scale)" if outcome.kind == "fraction" else "labelled train rows per class (log scale)")
    ax.set_ylabel(f"test {outcome.metric}")
    repeats = int(table["repeats"].max()) if len(table) else 0
    ax.set_title(f"Label efficiency on {outcome.dataset}: mean over {repeats} repeats, band min-max", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    outcome.files["figure"] = out / "curve.png"
    fig.savefig(outcome.files["figure"], dpi=120)
    plt.close(fig)
    return outcome.files
