"""The study's table and figure from the ledger.

Rows are backbone x scenario (frozen/unfrozen x linear/DeiT head; finetune's partial unfreezing is a
row of its own, last<K>-<head>), columns the datasets with their primary test metric, then the average
and the gain relative to the ImageNet baseline (`deit` with a linear head, same freeze setting), as the
study reports it: the per-dataset relative gain (score - baseline) / baseline in %, averaged over the
datasets both rows have.

Each cell is selected by validation, never by test: among the cell's configurations the one with the
best mean validation score wins, and the cell shows its mean test score over seeds.

A row is (backbone, scenario, stage, backbone random, head random): a frozen scenario trained from the
cache (`probe`) and the same scenario trained end to end on live images (`finetune --freeze all`) are
different protocols, so they are different rows, the latter labelled "end to end". Rows whose backbone
or pretrained head started from random weights are labelled RANDOM and kept apart.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from probe.results import Ledger, RunRecord

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINE = "deit"
ROW_KEY = ["backbone", "scenario", "stage", "backbone_random", "head_random"]
AVERAGE, GAIN = "average", "gain vs deit linear (%)"
RANDOM_NOTE = ("RANDOM backbone: features of an untrained backbone; RANDOM head: a DeiT head whose ImageNet weights were "
               "missing. Such rows say nothing about the pretrained models.")


@dataclass
class Report:
    table: pd.DataFrame  # index: ROW_KEY; columns: datasets, AVERAGE, GAIN
    metrics: dict[str, str]  # dataset -> its primary metric
    runs: int
    files: dict[str, Path]


def build_table(records: list[RunRecord]) -> tuple[pd.DataFrame, dict[str, str]]:
    """One cell per (row key, dataset): the best-validation configuration's mean test score."""
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    metrics: dict[str, str] = {}
    for r in records:
        row = (r.backbone, r.scenario, r.stage, r.backbone_random, r.head_random)
        groups[(*row, r.dataset)][json.dumps(r.config, sort_keys=True)].append(r)
        metrics[r.dataset] = r.primary_metric
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for (*row, dataset), by_config in groups.items():
        chosen = max(by_config.values(), key=lambda runs: _finite_or_low(_mean([r.val_score for r in runs])))
        cells[tuple(row)][dataset] = _mean([r.test_primary for r in chosen])
    datasets = sorted(metrics)
    table = pd.DataFrame(
        [[row.get(d, math.nan) for d in datasets] for row in cells.values()],
        index=pd.MultiIndex.from_tuples(list(cells), names=ROW_KEY), columns=datasets,
    )
    table[AVERAGE] = table[datasets].mean(axis=1, skipna=True)
    table[GAIN] = [_gain(table, key, datasets) for key in table.index]
    return table.sort_values(GAIN, na_position="last"), metrics


def _gain(table: pd.DataFrame, key: tuple, datasets: list[str]) -> float:
    """Mean over datasets of the relative gain (%) over the deit linear row of the same freeze setting (last<K> too),
    from the same stage when there is one, pretrained before random."""
    freeze = key[1].split("-")[0]
    candidates = [k for k in table.index if k[0] == BASELINE and k[1] == f"{freeze}-linear"]
    if not candidates:
        return math.nan
    base = table.loc[sorted(candidates, key=lambda k: (k[2] != key[2], k[3], k[4]))[0], datasets]
    row = table.loc[key, datasets]
    gains = [(row[d] - base[d]) / abs(base[d]) * 100 for d in datasets if np.isfinite(row[d]) and np.isfinite(base[d]) and base[d]]
    return float(np.mean(gains)) if gains else math.nan


def row_label(key: tuple) -> str:
    """`dinov2 frozen-linear`, plus `end to end` for a frozen scenario trained on live images, plus what was RANDOM."""
    backbone, scenario, stage, backbone_random, head_random = key
    notes = ["end to end"] if stage == "finetune" and scenario.startswith("frozen") else []
    random = [part for part, flag in (("backbone", backbone_random), ("head", head_random)) if flag]
    if random:
        notes.append(f"RANDOM {' and '.join(random)}")
    return f"{backbone} {scenario}" + (f" ({', '.join(notes)})" if notes else "")


def is_random(key: tuple) -> bool:
    return bool(key[3] or key[4])


def make_report(ledger: Ledger, datasets: list[str] | None = None, out: Path | None = None) -> Report:
    """Build the table from the ledger and write report.csv, report.md and report.png into `out`."""
    records = ledger.rows(dataset=datasets) if datasets else ledger.rows()
    table, metrics = build_table(records)
    files: dict[str, Path] = {}
    if out is not None and len(table):
        out.mkdir(parents=True, exist_ok=True)
        labelled = table.set_axis([row_label(k) for k in table.index])
        files["csv"] = out / "report.csv"
        labelled.rename_axis("row").to_csv(files["csv"], float_format="%.4f")
        files["markdown"] = out / "report.md"
        files["markdown"].write_text(to_markdown(labelled, metrics))
        files["figure"] = out / "report.png"
        plot_gain(labelled, files["figure"])
    return Report(table, metrics, len(records), files)


def to_markdown(table: pd.DataFrame, metrics: dict[str, str]) -> str:
    header = ["backbone x scenario"] + [f"{c} ({metrics[c]})" if c in metrics else c for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.iterrows():
        lines.append("| " + " | ".join([str(label)] + [_fmt(v, c == GAIN) for c, v in row.items()]) + " |")
    notes = [
        "",
        "Test scores of the configuration with the best validation score (mean over seeds).",
        f"Gain: mean relative gain (%) over the {BASELINE} linear baseline of the same frozen/unfrozen setting.",
    ]
    if any("RANDOM" in str(label) for label in table.index):
        notes.append(RANDOM_NOTE)
    return "\n".join(lines + notes) + "\n"


def plot_gain(table: pd.DataFrame, path: Path) -> None:
    """The study's figure: relative gain per backbone x head, sorted, one horizontal bar each."""
    gains = table[GAIN].dropna().sort_values()
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(gains), 1) + 1.6))
    colors = ["#c0504d" if v < 0 else "#4f81bd" for v in gains.values]
    bars = ax.barh(range(len(gains)), gains.values, color=colors)
    for bar, label in zip(bars, gains.index, strict=True):
        if "RANDOM" in label:
            bar.set_hatch("//")
    ax.set_yticks(range(len(gains)), list(gains.index))
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"relative gain over {BASELINE} linear (%), mean over datasets")
    ax.set_title("Gain over the ImageNet baseline" + ("\n(hatched: RANDOM weights)" if any("RANDOM" in i for i in gains.index) else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float, percent: bool = False) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:+.2f}" if percent else f"{value:.4f}"


def _mean(values: list[float | None]) -> float:
    """Mean of the finite values; NaN when there is none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _finite_or_low(value: float) -> float:
    return value if np.isfinite(value) else -math.inf
