"""`probe report --by COLUMN`: each cell's primary metric per subgroup of the test set (sex, age decade, view, ...).

A subgroup is a value of a per-sample metadata column that the dataset carries (CheXpert's Sex, Age and
Frontal/Lateral, ISIC 2019's optional metadata file, the extra columns of a CSV dataset), stored in the cache at
extraction (`CacheReader.metadata`). A cell's runs' stored test predictions (`predictions.npz`) are matched by id
with the metadata of the cache the runs read; each group is scored alone (the seeds of a cell averaged) with a
bootstrap interval over its rows, and the cell reports its worst group and the gap (best - worst group score) among
the groups large enough to be judged (`--min-group`, 30 samples by default), with every group's sample count. Ages bin
into decades (`60-69`); a blank value is the group `unknown`. Rows trained end to end (finetune) read no cache and
are left out, said in a note.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import Task
from cache.store import CacheReader
from common.errors import MedfmError
from ledger.records import RunRecord
from ledger.runs import read_config
from report.table import Column, Report, replicate_predictions
from scoring.bootstrap import bootstrap, check_settings
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


MIN_GROUP_N = 30  # groups smaller than this are shown with their interval but never named the worst group


def subgroup_table(report: Report, by: str, *, min_n: int = MIN_GROUP_N, level: float = 95, boot: int = 1000,
                   seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """One line per (row, dataset column, group): the group's score (the mean over the cell's seeds; a cross-validated
    cell's out-of-fold predictions), its `level`% bootstrap interval and its sample count, with the cell's worst group
    among those of at least `min_n` samples and the gap to its best. Returns the table and notes. A dataset without
    the column is one clear error."""
    if min_n < 1:
        raise MedfmError(f"--min-group must be at least 1 sample, got {min_n}")
    check_settings(level, boot, 1, seed)
    lines, notes, skipped, small = [], [], set(), 0
    for (key, label), runs in report.chosen.items():
        if key not in report.rows:
            continue
        row = report.rows[key].label
        if key[2] != "probe":
            skipped.add(row)
            continue
        column = next(c for c in report.columns if c.label == label)
        name, task, groups, replicates = _grouped_predictions(runs, row, column, by)
        truth = replicates[0][1]
        scored = {}
        for group in sorted(set(groups)):
            mask = groups == group
            stream = int(hashlib.sha256(f"{column.dataset_id}/{group}".encode()).hexdigest()[:8], 16)
            values = [compute_metrics(task, truth[mask], logits[mask], only=column.metric)[column.metric] for _, _, logits in replicates]
            bounds = bootstrap(column.metric, truth[mask], [logits[mask] for _, _, logits in replicates], level=level, boot=boot,
                               seed=seed, stream=stream)
            scored[group] = (float(np.nanmean(values)) if np.isfinite(values).any() else math.nan, int(mask.sum()), bounds)
        eligible = {g: v for g, (v, n, _) in scored.items() if math.isfinite(v) and n >= min_n}
        small += sum(n < min_n for _, n, _ in scored.values())
        worst = min(eligible, key=eligible.get) if eligible else ""
        gap = max(eligible.values()) - min(eligible.values()) if len(eligible) > 1 else math.nan
        for group, (score, n, bounds) in scored.items():
            lines.append({"row": row, "dataset": label, "metric": column.metric, "column": name, "group": group, "n": n,
                          "score": score, "ci low": bounds.low, "ci high": bounds.high, "small": n < min_n,
                          "worst group": worst, "gap": gap})
    notes.append(f"[low, high]: {level:g}% percentile bootstrap interval over {boot} resamples of the group's test rows (seed "
                 f"{seed}); worst group and gap: among groups of at least {min_n} samples (--min-group)"
                 + (f"; {small} smaller groups marked 'small'." if small else "."))
    if skipped:
        notes.append(f"left out (trained end to end, no cache metadata): {', '.join(sorted(skipped))}.")
    return pd.DataFrame(lines, columns=COLUMNS), notes


COLUMNS = ["row", "dataset", "metric", "column", "group", "n", "score", "ci low", "ci high", "small", "worst group", "gap"]


def _grouped_predictions(runs: list[RunRecord], row: str, column: Column, by: str) -> tuple[str, Task, np.ndarray, list]:
    """The metadata column `by` names, the task, each test row's group, and the cell's replicates (ids, labels, logits; the same
    rows in the same order for every seed, `report.table.replicate_predictions`). Groups are looked up in every split
    of the cache, since a cross-validated run tests on train rows too."""
    cache = Path(read_config(runs[0]).cache or "")
    if not cache.is_file():
        raise MedfmError(f"no subgroups for {row} on {column.label}: its cache {cache} is gone; re-extract it or leave the dataset "
                         "out with --dataset")
    with CacheReader(cache) as reader:
        metadata = {s: reader.metadata(s) for s in reader.splits}
        ids = {s: reader.ids(s) for s in reader.splits}
        task = reader.task
    found = find_column(list(metadata.get("test", {})), by)
    if found is None:
        have = ", ".join(metadata.get("test", {})) or "none"
        raise MedfmError(f"--by {by}: dataset {column.label} has no such per-sample column (its columns: {have}); "
                         "choose one of them or leave the dataset out with --dataset")
    group_of = {i: g for s in metadata if found in metadata[s] for i, g in zip(ids[s], group_values(found, metadata[s][found]), strict=True)}
    replicates = list(replicate_predictions(runs, row, column))
    if any(not np.array_equal(r[0], replicates[0][0]) for r in replicates):
        raise MedfmError(f"no subgroups for {row} on {column.label}: its seeds were scored on different test rows; retrain them "
                         "on one cache")
    return found, task, np.array([group_of.get(i, UNKNOWN) for i in replicates[0][0]], dtype=object), replicates


def summary_lines(table: pd.DataFrame) -> list[tuple[str, str, str, str, str]]:
    """Per (row, dataset): every group's `score [low, high] (n=..)`, the worst group and the gap, as the terminal table
    shows them."""
    out = []
    for (row, dataset), part in table.groupby(["row", "dataset"], sort=False):
        groups = "; ".join(f"{g} {_fmt(s)} [{_fmt(lo)}, {_fmt(hi)}] (n={n}{', small' if few else ''})"
                           for g, s, lo, hi, n, few in zip(part["group"], part["score"], part["ci low"], part["ci high"], part["n"],
                                                           part["small"], strict=True))
        out.append((row, dataset, groups, str(part["worst group"].iloc[0]) or "-", _fmt(part["gap"].iloc[0])))
    return out


def write_subgroups(table: pd.DataFrame, out: Path, by: str, stem: str = "report") -> Path:
    """`<stem>_by_<column>.csv`, named after the report it belongs to (`report.table.report_stem`), so reports of other
    options keep their own."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_by_{''.join(c if c.isalnum() or c in '-_' else '_' for c in by)}.csv"
    table.to_csv(path, index=False, float_format="%.4f")
    return path


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "-"
