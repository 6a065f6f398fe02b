"""`probe report --by COLUMN`: each cell's primary metric per subgroup of the test set (sex, age decade, view, ...).

A subgroup is a value of a per-sample metadata column that the dataset carries (CheXpert's Sex, Age and
Frontal/Lateral, ISIC 2019's optional metadata file, the extra columns of a CSV dataset), stored in the cache at
extraction (`CacheReader.metadata`). A cell's runs' stored test predictions (`predictions.npz`) are matched by id
with the test metadata of the cache each run read; each group is scored alone (the seeds of a cell averaged), and
the cell reports its worst group and the gap (best - worst group score) with every group's sample count. Ages bin
into decades (`60-69`); a blank value is the group `unknown`. Rows trained end to end (finetune) read no cache and
are left out, said in a note.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from cache.store import CacheReader
from common.errors import MedfmError
from ledger.predictions import load_predictions
from ledger.runs import read_config
from report.table import Report
from scoring.metrics import compute_metrics

UNKNOWN = "unknown"


def find_column(available: list[str], by: str) -> str | None:
    """The metadata column `by` names: its exact name in any case, else one named `<by>_...` (age -> age_approx)."""
    lowered = {c.lower(): c for c in available}
    if by.lower() in lowered:
        return lowered[by.lower()]
    prefixed = [c for c in available if c.lower().startswith(f"{by.lower()}_")]
    return prefixed[0] if len(prefixed) == 1 else None


def group_values(column: str, values: np.ndarray) -> np.ndarray:
    """Each sample's group: ages in decades (`60-69`), other values as they are, blanks `unknown`."""
    out = np.array([str(v).strip() or UNKNOWN for v in values], dtype=object)
    if "age" in column.lower():
        for i, v in enumerate(out):
            try:
                decade = int(float(v)) // 10 * 10
            except ValueError:
                continue
            out[i] = f"{decade}-{decade + 9}"
    return out


def subgroup_table(report: Report, by: str) -> tuple[pd.DataFrame, list[str]]:
    """One line per (row, dataset column, group): the group's mean score over the cell's seeds and its sample count, with
    the cell's worst group and gap. Returns the table and notes. A dataset without the column is one clear error."""
    lines, notes, skipped = [], [], set()
    for (key, label), runs in report.chosen.items():
        if key not in report.rows:
            continue
        row = report.rows[key].label
        if key[2] != "probe":
            skipped.add(row)
            continue
        column = next(c for c in report.columns if c.label == label)
        scores: dict[str, list[float]] = defaultdict(list)
        counts: dict[str, int] = {}
        name = by
        for run in runs:
            cache = Path(read_config(run).cache or "")
            if not cache.is_file():
                raise MedfmError(f"no subgroups for {row} on {label}: its cache {cache} is gone; re-extract it or leave the dataset "
                                 "out with --dataset")
            with CacheReader(cache) as reader:
                metadata, ids, task = reader.metadata("test"), reader.ids("test"), reader.task
            found = find_column(list(metadata), by)
            if found is None:
                have = ", ".join(metadata) or "none"
                raise MedfmError(f"--by {by}: dataset {label} has no such per-sample column (its columns: {have}); "
                                 "choose one of them or leave the dataset out with --dataset")
            name = found
            group_of = dict(zip(ids, group_values(found, metadata[found]), strict=True))
            stored = load_predictions(run.run_dir, "test")
            groups = np.array([group_of.get(i, UNKNOWN) for i in stored.ids], dtype=object)
            for group in sorted(set(groups)):
                mask = groups == group
                value = compute_metrics(task, stored.labels[mask], stored.logits[mask], only=column.metric)[column.metric]
                scores[group].append(float(value))
                counts[group] = int(mask.sum())
        means = {g: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for g, v in scores.items()}
        finite = {g: v for g, v in means.items() if math.isfinite(v)}
        worst = min(finite, key=finite.get) if finite else ""
        gap = max(finite.values()) - min(finite.values()) if finite else math.nan
        for group in sorted(means):
            lines.append({"row": row, "dataset": label, "metric": column.metric, "column": name, "group": group,
                          "n": counts[group], "score": means[group], "worst group": worst, "gap": gap})
    if skipped:
        notes.append(f"left out (trained end to end, no cache metadata): {', '.join(sorted(skipped))}.")
    return pd.DataFrame(lines, columns=["row", "dataset", "metric", "column", "group", "n", "score", "worst group", "gap"]), notes


def summary_lines(table: pd.DataFrame) -> list[tuple[str, str, str, str, str]]:
    """Per (row, dataset): every group's `score (n=..)`, the worst group and the gap, as the terminal table shows them."""
    out = []
    for (row, dataset), part in table.groupby(["row", "dataset"], sort=False):
        groups = "; ".join(f"{g} {_fmt(s)} (n={n})" for g, s, n in zip(part["group"], part["score"], part["n"], strict=True))
        out.append((row, dataset, groups, str(part["worst group"].iloc[0]) or "-", _fmt(part["gap"].iloc[0])))
    return out


def write_subgroups(table: pd.DataFrame, out: Path, by: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"report_by_{''.join(c if c.isalnum() or c in '-_' else '_' for c in by)}.csv"
    table.to_csv(path, index=False, float_format="%.4f")
    return path


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "-"
