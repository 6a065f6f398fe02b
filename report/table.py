"""The study's table from the ledger, and what its figures show (`gain_chart`, `score_chart`; `report.figures` draws them).

Rows are backbone x scenario (frozen/unfrozen x linear/DeiT head; finetune's partial unfreezing is a
row of its own, last<K>-<head>), columns the datasets with their primary test metric, then the average
and the gain relative to the ImageNet baseline (`deit` with a linear head, same freeze setting), as the
study reports it: the per-dataset relative gain (score - baseline) / baseline in %, averaged over the
datasets.

Each cell is selected by validation, never by test: among the cell's configurations the one with the
best mean validation score over its seeds wins (`ledger.store.best_configuration`, the rule `probe sweep`
uses too), and the cell shows its mean test score and how many seeds it averages (n).

A column is one dataset (`RunRecord.data_id`): the same data (name, root, options, split manifest), with one metric,
whatever each backbone's own input pipeline made of it: a comparison of backbones is a comparison across their input
pipelines. How a row's backbone was fed (image size, channels, normalisation, resize) is a property of the row, in
the CSV (`inputs`); a cell is marked `inputs` when its row was fed differently from the column's other rows in what the
study holds equal for every backbone (image size, channels, normalisation kind: `norm dataset` against `norm model`),
never for what is each backbone's own (its resize interpolation, its own mean and std under `norm model`). Two
folders of your own data under one loader name are two columns, named apart (`csv:a1b2`); `names` (`probe report
--name`) renames a column.

A row is (backbone, scenario, stage, backbone random, head random, protocol): a frozen scenario trained from
the cache (`probe`) and the same scenario trained end to end on live images (`finetune --freeze all`) are
different protocols, so they are different rows, the latter labelled "end to end"; runs of the study's
protocol never share a cell with medfm's. Rows whose backbone or pretrained head started from random
weights are labelled RANDOM and kept apart. A row is also marked when it lacks a dataset (`1/2 datasets`:
left out of the average and the gain unless `partial`), when it has no counterpart in the study
(`extension`), when its chosen runs departed from the study's recipe (`off-recipe`, the recipe in the CSV),
and a cell when its best validation epoch came in the last tenth of the epochs (`late`), or when a chosen run
collapsed to one class or scored within noise of chance (`collapsed`, `chance`; `scoring.health`).

Seeds: a cell averages the seeds of its configuration; the CSV gives their sample standard deviation
(`<column> std`, n-1 in the denominator; empty for one seed). Intervals (`add_intervals`, `probe report --ci 95`):
a percentile bootstrap of each cell's test score from its runs' stored predictions (`scoring.bootstrap`), over the
seed-mean when a cell averages seeds (every seed scored on the same resamples of the shared test rows), and of each
row's average and gain, the gain paired with its baseline's cells on the same resamples.

Scores of heads on other caches (`probe eval`, the ledger's `evaluations`) make two more tables of the chosen runs
(`evaluation_tables`): robustness, the relative drop of the primary metric per corruption kind averaged over the
severities scored, and its mean over kinds (MedMNIST-C's summary); transfer, the score on each other dataset beside the
in-domain one (docs/robustness.md §2).

Files (`write_report`): the table as CSV and Markdown, the gain figure and the score figure (each cell's test score, its
interval and the column's test rows), named by the options that change them (`report_stem`: `report.png` for the
default report, `report-ci95.png` with intervals), so a report never overwrites another's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import MedfmError
from common.runtime import device_kind
from common.study import (  # the study appends its DeiT classifier to the foundation models only
    BACKBONE_SETS,
    IMAGENET_BACKBONES,
    STUDY_BACKBONES,
)
from ledger.predictions import load_predictions
from ledger.records import INPUTS, STUDY_FIXED, EvaluationRecord, RunRecord, best_configuration, mean_score, replicate
from ledger.store import Ledger
from report.figures import GainChart, Panel, Row, ScoreChart, Value, draw_gain, draw_scores
from scoring.bootstrap import Interval, check_settings, interval, resample_metric
from training.recipe import STUDY

BASELINE = "deit"
ROW_KEY = ["backbone", "scenario", "stage", "backbone_random", "head_random", "protocol"]
AVERAGE, GAIN = "average", "gain vs deit linear (%)"
DEFAULT_PROTOCOL = "medfm"
DEFAULT_BOOT = 1000  # bootstrap resamples of `probe report --ci` unless --boot
MAX_STEM = 120  # characters of a report's file name before the extension
STUDY_IMAGE_SIZE, STUDY_HEAD_DEPTH, STUDY_HEAD_PRESET = 224, 12, "deit-b"
RANDOM_BACKBONE_NOTE = "RANDOM backbone: features of an untrained backbone"
RANDOM_HEAD_NOTE = "RANDOM head: a DeiT head whose ImageNet weights were missing"
LATE_NOTE = ("late: the chosen runs' best validation epoch came in the last tenth of their epochs, so they may not have "
             "converged; raise --epochs (or, for a linear probe, use --standardize).")
HEALTH_NOTE = ("collapsed: a chosen run predicted one class for over 95% of the test rows; chance: its test score is not above "
               "the metric's chance level beyond noise (95% bootstrap interval, scoring/health.py). Such cells say the head learned little.")
PARTIAL_NOTE = "rows marked k/n datasets lack a dataset: left out of the average and the gain (`probe report --partial` includes them)."
INPUTS_NOTE = ("inputs: the row's backbone was fed this dataset differently from the column's other rows in what the study "
               "holds equal (image size, channels, normalisation kind; the CSV's inputs_differ says how): the gap may be the "
               "preparation's, not the backbone's. Each backbone's own resize and own statistics under --norm model are its "
               "pipeline and are not marked.")
NULL_NOTE = ("not above null: the cell's score (its interval's low end, with --ci) does not exceed the best of the same heads "
             "on random-weight draws of its backbone (`grid run --null K`, `extract run --weights random:k`): features that "
             "learned nothing from pretraining would score as well.")
EXTENSION_NOTE = ("extension: no counterpart in the study (a DeiT head on an ImageNet backbone, partial unfreezing, a kNN probe, or a "
                  "backbone outside its eight).")


@dataclass(frozen=True)
class Column:
    """One column of the table: a dataset identity and its metric, with the name a reader sees."""

    dataset_id: str
    metric: str
    dataset: str
    label: str
    inputs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def header(self) -> str:
        return f"{self.label} ({self.metric})"


@dataclass
class RowInfo:
    """What the table says about a row beside its numbers."""

    label: str
    covered: int  # columns with a score
    total: int  # columns of the report
    extension: bool
    recipe: list[str]  # departures from the study's recipe of the chosen runs; [] when none
    late: list[str]  # labels of the columns whose chosen runs' best epoch came late
    included: bool  # in the average and the gain

    @property
    def partial(self) -> bool:
        return self.covered < self.total


@dataclass
class Report:
    table: pd.DataFrame  # index: ROW_KEY; columns: column labels, AVERAGE, GAIN
    metrics: dict[str, str]  # column label -> its primary metric
    runs: int
    files: dict[str, Path]
    seeds: pd.DataFrame = field(default_factory=pd.DataFrame)  # seeds averaged per cell (0: no cell)
    late: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cell: the chosen runs' best epoch came late
    rows: dict[tuple, RowInfo] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    partial: bool = False
    figure_texts: list[str] = field(default_factory=list)  # what the gain figure writes: each bar's value and the notes, or why it has none
    score_texts: list[str] = field(default_factory=list)  # what the score figure writes: each panel's title and values, and the notes
    std: pd.DataFrame = field(default_factory=pd.DataFrame)  # per cell: sample std of the test score over its seeds (NaN: one seed)
    chosen: dict[tuple, list[RunRecord]] = field(default_factory=dict)  # (row key, column label) -> the runs the cell averages
    intervals: dict[tuple, Interval] = field(default_factory=dict)  # (row key, column label | AVERAGE | GAIN) -> its interval
    bootstrap: dict[str, Any] = field(default_factory=dict)  # the intervals' settings: level, boot, seed; {} without intervals
    costs: dict[tuple, dict[str, float]] = field(default_factory=dict)  # row key -> `cost_of` its chosen runs
    total_cost: dict[str, float] = field(default_factory=dict)  # `cost_of` every run of the report
    evaluations: EvaluationTables | None = None  # the robustness and transfer tables of `probe eval` scores
    differ: dict[tuple, str] = field(default_factory=dict)  # (row key, column label) -> how its inputs differ (`inputs_differ`)
    nulls: dict[tuple, list[float]] = field(default_factory=dict)  # (row key, column label) -> its null draws' scores (`add_nulls`)

    def marks(self, key: tuple, label: str) -> list[str]:
        """`collapsed` / `chance` when any of the cell's chosen runs was flagged so (`scoring.health`); `inputs` when its
        row was fed differently from the column's other rows in what the study holds equal (`inputs_differ`)."""
        runs = self.chosen.get((key, label), [])
        flags = [flag for flag in ("collapsed", "chance") if any(getattr(r, flag) for r in runs)]
        return flags + ["inputs"] * ((key, label) in self.differ) + ["not above null"] * (self.above_null(key, label) is False)

    def above_null(self, key: tuple, label: str) -> bool | None:
        """Whether the cell beats every null draw of its backbone (its interval's low end, when computed); None without nulls."""
        null = self.nulls.get((key, label))
        if not null:
            return None
        found = self.intervals.get((key, label))
        score = found.low if found is not None else self.table.loc[key, label]
        return bool(np.isfinite(score) and score > max(null))

    def cell(self, key: tuple, label: str) -> str:
        """A cell as a reader sees it: `0.9375 (n=3)`, with its interval `0.9375 [0.9100, 0.9600] (n=3)` when computed,
        `late`, `collapsed`, `chance` when flagged, `-` when empty."""
        value = self.table.loc[key, label]
        if not np.isfinite(value):
            return "-"
        n = int(self.seeds.loc[key, label])
        flags = ["late"] * bool(self.late.loc[key, label]) + self.marks(key, label)
        return f"{value:.4f}{self._bounds(key, label, False)} (n={n}{''.join(', ' + f for f in flags)})"

    def summary(self, key: tuple, name: str) -> str:
        """The row's AVERAGE or GAIN as a reader sees it, with its interval when computed: `+2.22 [-0.50, +4.90]`."""
        percent = name == GAIN
        text = _fmt(self.table.loc[key, name], percent)
        return text + self._bounds(key, name, percent) if text != "-" else text

    def _bounds(self, key: tuple, name: str, percent: bool) -> str:
        found = self.intervals.get((key, name))
        if found is None:
            return ""
        return f" [{_fmt(found.low, percent)}, {_fmt(found.high, percent)}]"


def row_key(record: RunRecord) -> tuple:
    return (record.backbone, record.scenario, record.stage, record.backbone_random, record.head_random, record.protocol)


def build_report(records: list[RunRecord], partial: bool = False, names: dict[str, str] | None = None) -> Report:
    """One cell per (row key, column): the best-validation configuration's mean test score over its seeds. Runs on null
    backbones (random-weight draws, `RunRecord.null_draw`) are no rows of their own: they are each cell's null (`nulls`)."""
    records = _latest(records)
    null_runs = [r for r in records if r.null_draw]
    records = [r for r in records if not r.null_draw]
    columns = _columns(records, names or {})
    column_of = {(c.dataset_id, c.metric): c for c in columns}  # dataset_id: the data (`RunRecord.data_id`)
    groups: dict[tuple, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[row_key(r)][column_of[(r.data_id, r.primary_metric)].label].append(r)
    labels = [c.label for c in columns]
    keys = list(groups)
    cells: dict[str, dict[tuple, tuple[float, int, bool, float]]] = {label: {} for label in labels}  # (mean test, seeds, late, std)
    recipes: dict[tuple, list[str]] = defaultdict(list)
    chosen_runs: dict[tuple, list[RunRecord]] = {}
    for key, by_column in groups.items():
        for label, runs in by_column.items():
            chosen = best_configuration(runs)
            chosen_runs[(key, label)] = chosen
            cells[label][key] = (mean_score([r.test_primary for r in chosen]), len({replicate(r) for r in chosen}),
                                 any(r.late_best for r in chosen), seed_std([r.test_primary for r in chosen]))
            for departure in recipe_departures(chosen[0]):
                if departure not in recipes[key]:
                    recipes[key].append(departure)
    index = pd.MultiIndex.from_tuples(keys, names=ROW_KEY) if keys else pd.MultiIndex.from_tuples([], names=ROW_KEY)

    def frame(part: int, empty: Any, dtype: type) -> pd.DataFrame:
        return pd.DataFrame({label: [cells[label][key][part] if key in cells[label] else empty for key in keys] for label in labels},
                            index=index, columns=labels, dtype=dtype)

    values, seeds, late, std = frame(0, math.nan, float), frame(1, 0, int), frame(2, False, bool), frame(3, math.nan, float)
    covered = {key: sum(key in cells[label] for label in labels) for key in keys}
    included = {key: partial or covered[key] == len(labels) for key in keys}
    table = values.copy()
    table[AVERAGE] = [values.loc[key, labels].mean(skipna=True) if included[key] else math.nan for key in keys]
    table[GAIN] = [_gain(values, key, labels, included, partial) for key in keys]
    rows = {
        key: RowInfo("", covered[key], len(labels), is_extension(key), recipes[key],
                     [label for label in labels if late.loc[key, label]], included[key])
        for key in keys
    }
    for key, info in rows.items():
        info.label = row_label(key, info)
    order = _in_set_order(table) if keys else table.index
    metrics = {c.label: c.metric for c in columns}
    costs = {key: cost_of([r for (k, _), runs in chosen_runs.items() if k == key for r in runs]) for key in keys}
    return Report(table.loc[order], metrics, len(records), {}, seeds.loc[order], late.loc[order], rows, columns, partial,
                  std=std.loc[order], chosen=chosen_runs, costs=costs, total_cost=cost_of(records), differ=inputs_differ(chosen_runs),
                  nulls=nulls(null_runs, list(chosen_runs), column_of))


def backbone_set(backbone: str) -> str:
    """Which set a backbone belongs to (`common.study.BACKBONE_SETS`: study, 2025, medical), or `other` (any other name)."""
    return next((name for name, members in BACKBONE_SETS.items() if backbone in members), "other")


def _in_set_order(table: pd.DataFrame) -> pd.Index:
    """Rows grouped by backbone set (the study's first, then 2025, medical, others), by gain within a set."""
    sets = list(BACKBONE_SETS) + ["other"]
    ranked = table.assign(_set=[sets.index(backbone_set(key[0])) for key in table.index])
    return ranked.sort_values(["_set", GAIN], na_position="last").index


def nulls(null_runs: list[RunRecord], cells: list[tuple], column_of: dict[tuple, Column]) -> dict[tuple, list[float]]:
    """Each cell's null: per random-weight draw of its backbone, the same scenario on the same data, the mean test score of
    the draw's best-validation configuration (the rule every cell follows)."""
    draws: dict[tuple, dict[int, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in null_runs:
        column = column_of.get((r.data_id, r.primary_metric))
        if column is not None:
            draws[(_null_key(row_key(r)), column.label)][r.null_draw].append(r)
    found = {}
    for key, label in cells:
        by_draw = draws.get((_null_key(key), label), {})
        scores = [mean_score([r.test_primary for r in best_configuration(runs)]) for runs in by_draw.values()]
        if scores:
            found[(key, label)] = scores
    return found


def _null_key(key: tuple) -> tuple:
    """A row key without its weights: the backbone's cells and its null draws' share it."""
    backbone, scenario, stage, _random, head_random, protocol = key
    return backbone, scenario, stage, head_random, protocol


COST_KINDS = ("GPU", "CPU")
COST_NOTE = ("cost: device hours of the row's chosen runs (each run's own seconds; a sweep's heads share their pass) plus "
             "the extraction of each cache they read, counted once per cache; GPU or CPU by where each part ran.")


def cost_of(runs: list[RunRecord]) -> dict[str, float]:
    """Seconds by device kind (`GPU`, `CPU`) of `runs`: each run's own `cost_seconds`, plus each distinct cache's
    `extract_seconds` once (every probe run of a cache records its whole extraction). `unrecorded`: how many runs
    and caches have no recorded cost (ledgers before the cost columns), so that a total never hides them."""
    out = dict.fromkeys((*COST_KINDS, "unrecorded"), 0.0)
    caches: dict[str, RunRecord] = {}
    for r in runs:
        kind = device_kind(r.device)
        if r.cost_seconds is None or not kind:
            out["unrecorded"] += 1
        else:
            out[kind] += r.cost_seconds
        if r.stage == "probe" and r.cache_fingerprint:
            caches.setdefault(r.cache_fingerprint, r)
    for r in caches.values():
        kind = device_kind(r.extract_device)
        if r.extract_seconds is None or not kind:
            out["unrecorded"] += 1
        else:
            out[kind] += r.extract_seconds
    return out


def cost_text(cost: dict[str, float]) -> str:
    """`0.52 GPU-h + 0.01 CPU-h`, `(+2 unrecorded)` when some parts were not recorded, `-` when none was."""
    parts = [f"{cost[kind] / 3600:.2f} {kind}-h" for kind in COST_KINDS if cost.get(kind)]
    missing = int(cost.get("unrecorded", 0))
    text = " + ".join(parts) or ("-" if missing else "0.00 CPU-h")
    return text + (f" (+{missing} unrecorded)" if missing and parts else "")


def seed_std(values: list[float | None]) -> float:
    """Sample standard deviation (n-1) of the finite values; NaN with fewer than two."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _latest(records: list[RunRecord]) -> list[RunRecord]:
    """One row per run: a run retrained with --force replaces its earlier row, never counts as another seed."""
    return list({r.config_key: r for r in records}.values())


def _columns(records: list[RunRecord], names: dict[str, str]) -> list[Column]:
    """The distinct (data, metric) pairs, each named so that no two columns read alike."""
    first: dict[tuple[str, str], RunRecord] = {}
    for r in records:
        first.setdefault((r.data_id, r.primary_metric), r)
    base = {k: _user_name(r, names) or r.dataset_label or r.dataset for k, r in first.items()}
    by_base: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for k, label in base.items():
        by_base[label].append(k)
    columns = []
    for label, keys in by_base.items():
        named = _tell_apart(label, [first[k] for k in keys]) if len(keys) > 1 else [label]
        columns += [Column(k[0], k[1], first[k].dataset, name, first[k].dataset_inputs) for k, name in zip(keys, named, strict=True)]
    return sorted(columns, key=lambda c: (c.dataset, c.label))


def _user_name(record: RunRecord, names: dict[str, str]) -> str | None:
    """A user's name for a dataset, given by its label (`csv:a1b2`) or by a prefix of its id (4 digits at least)."""
    for given, name in names.items():
        if given in (record.dataset_label, record.dataset) or (len(given) >= 4 and (record.dataset_id.startswith(given) or record.data_id.startswith(given))):
            return name
    return None


def _tell_apart(label: str, runs: list[RunRecord]) -> list[str]:
    """Names for columns that share a label: their data's tag, else their metric or id."""
    tags = {r.data_id for r in runs if r.dataset_inputs}
    names = []
    for r in runs:
        if not r.dataset_inputs:
            names.append(f"{label} (settings not recorded)")
            continue
        names.append(f"{label}:{r.data_id[:4]}" if len(tags) > 1 and ":" not in label else label)
    if len(set(names)) < len(names):
        names = [f"{n} [{r.primary_metric}]" for n, r in zip(names, runs, strict=True)]
    if len(set(names)) < len(names):
        names = [f"{n} {r.data_id[:6]}" for n, r in zip(names, runs, strict=True)]
    return names


def _input_text(key: str, value: Any) -> str:
    return {"image_size": f"{value} px", "channels": f"{value} channel{'s' if value != 1 else ''}",
            "norm": f"norm {value}", "interpolation": f"{value} resize"}[key]


def inputs_text(runs: list[RunRecord]) -> str:
    """How the runs' backbone was fed the data: `224 px, 3 channels, norm model, bicubic resize` ("" when not recorded)."""
    fed = [r.fed for r in runs if r.fed]
    return "; ".join(dict.fromkeys(", ".join(_input_text(k, f[k]) for k in INPUTS if k in f) for f in fed))


def inputs_differ(chosen: dict[tuple, list[RunRecord]]) -> dict[tuple, str]:
    """(row key, column label) -> how the cell's row was fed differently from its column's other rows in what the study
    holds equal (`STUDY_FIXED`), for the cells outside the column's commonest way (every cell of a tie); none where
    rows differ only in what is each backbone's own (resize interpolation, its own statistics under `norm model`)."""
    by_column: dict[str, dict[tuple, tuple]] = defaultdict(dict)
    for (key, label), runs in chosen.items():
        fed = [r.fed for r in runs if r.fed]
        if fed:
            by_column[label][key] = tuple(fed[0].get(k) for k in STUDY_FIXED)
    marked = {}
    for label, ways in by_column.items():
        counts = Counter(ways.values())
        if len(counts) < 2:
            continue
        top = max(counts.values())
        common = [way for way, n in counts.items() if n == top]
        for key, way in ways.items():
            if way not in common or len(common) > 1:
                marked[(key, label)] = ", ".join(_input_text(k, v) for k, v, c in zip(STUDY_FIXED, way, common[0], strict=True)
                                                 if v != c or len(common) > 1)
    return marked


def recipe_departures(record: RunRecord) -> list[str]:
    """How a run's settings departed from the study's recipe (`training.recipe.STUDY`, 224 px, a 12-block DeiT-B head)."""
    config, out = record.config, []
    if config.get("solver") == "lbfgs":
        out.append("L-BFGS logistic regression")  # medfm's converged linear probe, not the study's AdamW recipe
    for name, text, study in (("epochs", "epochs {}", STUDY.epochs), ("lr", "lr {:g}", STUDY.lr),
                              ("weight_decay", "weight decay {:g}", STUDY.weight_decay), ("batch_size", "batch {}", STUDY.batch_size)):
        if name in config and config[name] != study:
            out.append(text.format(config[name]))
    size = record.dataset_inputs.get("image_size")
    if size is not None and size != STUDY_IMAGE_SIZE:
        out.append(f"{size} px")
    if config.get("head_depth", STUDY_HEAD_DEPTH) != STUDY_HEAD_DEPTH:
        out.append(f"head depth {config['head_depth']}")
    if config.get("head_preset", STUDY_HEAD_PRESET) != STUDY_HEAD_PRESET:
        out.append(f"head {config['head_preset']}")
    if config.get("grad_clip", STUDY.grad_clip) != STUDY.grad_clip:
        out.append(f"grad clip {config['grad_clip'] or 'none'}")
    for name, text in (("warmup_steps", "warmup {} steps"), ("patience", "patience {}")):
        if config.get(name) is not None:
            out.append(text.format(config[name]))
    if config.get("standardize"):
        out.append("standardize")
    return out


def _gain(values: pd.DataFrame, key: tuple, labels: list[str], included: dict[tuple, bool], partial: bool) -> float:
    """Mean over datasets of the relative gain (%) over the deit linear row of the same freeze setting (last<K> too) and
    protocol, from the same stage when there is one, pretrained before random. Without `partial`, both rows must have
    every dataset."""
    base_key = _baseline_key(list(values.index), key, included)
    if base_key is None:
        return math.nan
    base, row = values.loc[base_key, labels], values.loc[key, labels]
    gains = [(row[d] - base[d]) / abs(base[d]) * 100 for d in _gain_labels(values, key, base_key, labels)]
    return float(np.mean(gains)) if gains else math.nan


def _baseline_key(keys: list[tuple], key: tuple, included: dict[tuple, bool]) -> tuple | None:
    """The row a row's gain is over (see `_gain`), or None when there is none or either row is left out."""
    if not included[key]:
        return None
    freeze = key[1].split("-")[0]
    candidates = [k for k in keys if k[0] == BASELINE and k[1] == f"{freeze}-linear" and k[5] == key[5]]
    if not candidates:
        return None
    base_key = sorted(candidates, key=lambda k: (k[2] != key[2], k[3], k[4]))[0]
    return base_key if included[base_key] else None


def _gain_labels(values: pd.DataFrame, key: tuple, base_key: tuple, labels: list[str]) -> list[str]:
    """The columns a gain averages: both rows scored, the baseline's score not 0."""
    base, row = values.loc[base_key, labels], values.loc[key, labels]
    return [d for d in labels if np.isfinite(row[d]) and np.isfinite(base[d]) and base[d]]


def is_extension(key: tuple) -> bool:
    """No counterpart in the study: a backbone outside its eight, partial unfreezing, a DeiT head on an ImageNet backbone."""
    backbone, scenario = key[0], key[1]
    freeze, head = scenario.split("-")
    return (backbone not in STUDY_BACKBONES or freeze not in ("frozen", "unfrozen") or head == "knn" or scenario == "zero-shot"
            or (head == "deit" and backbone in IMAGENET_BACKBONES))


def row_label(key: tuple, info: RowInfo | None = None) -> str:
    """`dinov2 frozen-linear`, plus `end to end` for a frozen scenario trained on live images, what was RANDOM, a protocol
    other than medfm's, and (given the row's `info`) extension, off-recipe and missing datasets."""
    backbone, scenario, stage, backbone_random, head_random = key[:5]
    protocol = key[5] if len(key) > 5 else DEFAULT_PROTOCOL
    notes = ["end to end"] if stage == "finetune" and scenario.startswith("frozen") else []
    random = [part for part, flag in (("backbone", backbone_random), ("head", head_random)) if flag]
    if random:
        notes.append(f"RANDOM {' and '.join(random)}")
    if protocol != DEFAULT_PROTOCOL:
        notes.append(protocol if "views" in protocol else f"{protocol} protocol")
    if info is not None:
        notes += ["extension"] * info.extension + ["off-recipe"] * bool(info.recipe)
        if info.partial:
            notes.append(f"{info.covered}/{info.total} datasets")
    return f"{backbone} {scenario}" + (f" ({', '.join(notes)})" if notes else "")


def is_random(key: tuple) -> bool:
    return bool(key[3] or key[4])


def select(records: list[RunRecord], datasets: list[str]) -> list[RunRecord]:
    """The runs of the named datasets: a name (`aptos2019`), a label (`csv:a1b2`) or a dataset id prefix."""
    return [r for r in records if any(d in (r.dataset, r.dataset_label) or (len(d) >= 4 and (r.dataset_id.startswith(d) or r.data_id.startswith(d))) for d in datasets)]


def make_report(ledger: Ledger, datasets: list[str] | None = None, out: Path | None = None, *, partial: bool = False,
                names: dict[str, str] | None = None, ci: float | None = None, boot: int = DEFAULT_BOOT, boot_seed: int = 0,
                jobs: int = 1) -> Report:
    """Build the table from the ledger, with `ci`% bootstrap intervals when asked (`add_intervals`), and write its files
    into `out` (`write_report`), named by the options that change them (`report_stem`)."""
    if ci is not None:
        check_settings(ci, boot, jobs, boot_seed)  # before any work
    records = [r for r in ledger.rows() if not r.config.get("train_subset")]  # label-efficiency runs belong to `probe curve`
    if datasets:
        records = select(records, datasets)
    report = build_report(records, partial, names)
    reported = {r.id for r in records}
    if evaluations := [e for e in ledger.evaluations() if e.run_id in reported]:  # `probe eval` scores of the report's runs
        report.evaluations = evaluation_tables(report, evaluations)
    if ci is not None and len(report.table):
        add_intervals(report, ci, boot, boot_seed, jobs)
    if out is not None and len(report.table):
        write_report(report, out, report_stem(datasets, partial, names, ci, boot, boot_seed))
    return report


def report_stem(datasets: list[str] | None = None, partial: bool = False, names: dict[str, str] | None = None,
                ci: float | None = None, boot: int = DEFAULT_BOOT, boot_seed: int = 0) -> str:
    """The name of a report's files: `report` for the default report, else one part per option that changes what they
    hold (`report-ci95`, `report-dataset-aptos2019-partial`), so a report never overwrites another's files. Parallel
    jobs change nothing and name nothing; a name too long for a file keeps its start and a hash of the whole."""
    parts = ["report"]
    if datasets:
        parts.append("dataset-" + "-".join(sorted(set(datasets))))
    if partial:
        parts.append("partial")
    if names:
        parts.append("name-" + "-".join(f"{given}={name}" for given, name in sorted(names.items())))
    if ci is not None:
        parts += [f"ci{ci:g}", *([f"boot{boot}"] * (boot != DEFAULT_BOOT)), *([f"bootseed{boot_seed}"] * bool(boot_seed))]
    stem = re.sub(r"[^A-Za-z0-9.=_-]+", "_", "-".join(parts))
    return stem if len(stem) <= MAX_STEM else f"{stem[:MAX_STEM - 9]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"


def write_report(report: Report, out: Path, stem: str = "report") -> None:
    """`<stem>.csv`, `<stem>.md`, the gain figure `<stem>.png`, the score figure `<stem>-scores.png` and the `probe eval`
    tables into `out`, each path in `report.files`."""
    out.mkdir(parents=True, exist_ok=True)
    report.files["csv"] = out / f"{stem}.csv"
    to_csv(report).to_csv(report.files["csv"], index=False, float_format="%.4f")
    report.files["markdown"] = out / f"{stem}.md"
    report.files["markdown"].write_text(to_markdown(report))
    report.files["figure"] = out / f"{stem}.png"
    report.figure_texts = draw_gain(gain_chart(report), report.files["figure"])
    report.files["scores"] = out / f"{stem}-scores.png"
    report.score_texts = draw_scores(score_chart(report), report.files["scores"])
    write_evaluations(report, out, stem)


def write_evaluations(report: Report, out: Path, stem: str = "report") -> None:
    """`<stem>_robustness.csv` and `<stem>_transfer.csv` (the target score and `in-domain` per pair), when there is one."""
    tables = report.evaluations
    if tables is None:
        return
    if len(tables.robustness):
        report.files["robustness"] = out / f"{stem}_robustness.csv"
        tables.robustness.reset_index().to_csv(report.files["robustness"], index=False, float_format="%.4f")
    if len(tables.transfer):
        report.files["transfer"] = out / f"{stem}_transfer.csv"
        both = pd.concat([tables.transfer, tables.in_domain.add_suffix(" in-domain")], axis=1).rename_axis("backbone x scenario")
        both.reset_index().to_csv(report.files["transfer"], index=False, float_format="%.4f")


def add_intervals(report: Report, level: float, boot: int, seed: int = 0, jobs: int = 1) -> None:
    """`level`% percentile bootstrap intervals of every cell, average and gain (`scoring.bootstrap`), into `report.intervals`.

    Each column's resamples are drawn once per (seed, dataset identity): every cell of the column, each of its seeds, is
    scored on the same resamples of the same test rows (matched by sample id), so a cell's interval is over its seed-mean,
    a row's average is averaged per resample, and its gain is paired with the baseline's cells resample by resample."""
    check_settings(level, boot, jobs, seed)
    labels = [c.label for c in report.columns]
    samples: dict[tuple, dict[str, np.ndarray]] = defaultdict(dict)
    for column in report.columns:
        reference: tuple[str, np.ndarray, np.ndarray] | None = None  # (the row that set it, sorted ids, their labels)
        stream = int(hashlib.sha256(column.dataset_id.encode()).hexdigest()[:8], 16)
        for key in report.table.index:
            runs = report.chosen.get((key, column.label))
            if not runs:
                continue
            logits = []
            for ids, truth, scores in replicate_predictions(runs, report.rows[key].label, column):
                if reference is None:
                    reference = (report.rows[key].label, ids, truth)
                elif not (np.array_equal(ids, reference[1]) and np.array_equal(truth, reference[2], equal_nan=truth.dtype.kind == "f")):
                    raise MedfmError(f"no interval for {report.rows[key].label} on {column.label}: its stored test rows (ids or "
                                     f"labels, {runs[0].run_dir}) differ from those of {reference[0]}; cells of one column must share them")
                logits.append(scores)
            assert reference is not None
            samples[key][column.label] = resample_metric(column.metric, reference[2], logits, boot=boot, seed=seed, stream=stream, jobs=jobs)
            report.intervals[(key, column.label)] = interval(samples[key][column.label], level)
    values = report.table[labels]
    included = {key: info.included for key, info in report.rows.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        for key in report.table.index:
            if not np.isfinite(report.table.loc[key, AVERAGE]):
                continue
            scored = [d for d in labels if np.isfinite(values.loc[key, d])]
            report.intervals[(key, AVERAGE)] = interval(np.mean([samples[key][d] for d in scored], axis=0), level)
            base_key = _baseline_key(list(values.index), key, included)
            if base_key is None or not np.isfinite(report.table.loc[key, GAIN]):
                continue
            gains = [(samples[key][d] - samples[base_key][d]) / np.abs(samples[base_key][d]) * 100
                     for d in _gain_labels(values, key, base_key, labels)]
            gain = np.mean(gains, axis=0)
            report.intervals[(key, GAIN)] = interval(np.where(np.isfinite(gain), gain, np.nan), level)  # a baseline of 0: undefined
    report.bootstrap = {"level": level, "boot": boot, "seed": seed}


def replicate_predictions(runs: list[RunRecord], row: str, column: Column) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each seed's stored test ids, labels and logits, in the order of the ids. A cross-validated seed's folds are joined
    into its out-of-fold predictions, which cover every pooled row once (`probe.folds`): its interval resamples them."""
    by_seed: dict[int, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_seed[run.seed].append(run)
    for seed, members in by_seed.items():
        folds = int(members[0].config.get("folds", 0))
        if folds and len(members) != folds:
            raise MedfmError(f"no interval for {row} on {column.label}: {len(members)} of its {folds} folds (seed {seed}) are in "
                             f"the ledger; run the rest with probe run --folds {folds}")
        parts = [_sorted_predictions(run, row, column) for run in members]
        ids = np.concatenate([p[0] for p in parts])
        order = np.argsort(ids, kind="stable")
        yield ids[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def _sorted_predictions(run: RunRecord, row: str, column: Column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A run's stored test ids, labels and logits, in the order of the ids; a run without them is one clear error."""
    try:
        stored = load_predictions(run.run_dir, "test")
    except MedfmError as err:
        raise MedfmError(f"no interval for {row} on {column.label}: {err}") from None
    order = np.argsort(stored.ids, kind="stable")
    return stored.ids[order], stored.labels[order], stored.logits[order]


MEAN_DROP = "mean"
ROBUSTNESS_NOTE = ("robustness: relative drop (%) of the primary test metric on each corrupted test view, (clean - corrupted) / "
                   "clean, averaged over the severities scored (`probe eval --corrupted`), then over the kinds (mean); higher is "
                   "worse. Clean: the run's own test score; seeds averaged before the drop.")
TRANSFER_NOTE = ("transfer: the head's primary metric on another dataset's test split (`probe eval --cache`), classes mapped by "
                 "the dataset's label map; in brackets its test score where it was trained.")


@dataclass
class EvaluationTables:
    """`probe eval` scores of the report's chosen runs: robustness (index: row label, dataset; columns: corruption kinds
    then MEAN_DROP; the relative drop in %) and transfer (index: row label; columns `trained on -> evaluated on`; the
    target score, and `in_domain` the same runs' own test score)."""

    robustness: pd.DataFrame
    transfer: pd.DataFrame
    in_domain: pd.DataFrame
    left_out: int  # evaluations of runs no cell chose (another configuration or seed), not in either table


def evaluation_tables(report: Report, evaluations: list[EvaluationRecord]) -> EvaluationTables:
    """Each chosen cell's evaluations: per corruption kind, the relative drop averaged over severities (the cell's seeds
    averaged first, MedMNIST-C's mean relative drop); per other dataset, the mean target score."""
    by_run: dict[int, list[EvaluationRecord]] = defaultdict(list)
    for e in evaluations:
        by_run[e.run_id].append(e)
    drops: dict[tuple, dict[str, float]] = {}
    transfer: dict[str, dict[str, float]] = defaultdict(dict)
    in_domain: dict[str, dict[str, float]] = defaultdict(dict)
    used: set[int] = set()
    for (key, label), runs in report.chosen.items():
        row = report.rows[key].label
        corrupted: dict[str, dict[Any, list[tuple[float | None, float | None]]]] = defaultdict(lambda: defaultdict(list))
        targets: dict[str, list[tuple[float | None, float | None]]] = defaultdict(list)
        for run in runs:
            for e in by_run.get(run.id or -1, []):
                if e.corruption_kind and e.dataset_id == run.dataset_id:
                    corrupted[e.corruption_kind][e.corruption_severity].append((run.test_primary, e.score))
                elif not e.corruption_kind and e.dataset_id != run.dataset_id:
                    target = e.dataset_label if e.dataset_label != label else f"{e.dataset_label}:{e.dataset_id[:4]}"
                    targets[f"{label} -> {target}"].append((run.test_primary, e.score))
                else:
                    continue
                used.add(e.id or -1)
        if corrupted:
            cells = {kind: _mean_drop(list(severities.values())) for kind, severities in sorted(corrupted.items())}
            drops[(row, label)] = {**cells, MEAN_DROP: mean_score(list(cells.values()))}
        for pair, scores in targets.items():
            in_domain[row][pair] = mean_score([own for own, _ in scores])
            transfer[row][pair] = mean_score([score for _, score in scores])
    robustness = pd.DataFrame.from_dict(drops, orient="index")
    if len(robustness):
        robustness = robustness[[*sorted(c for c in robustness.columns if c != MEAN_DROP), MEAN_DROP]]
        robustness.index = pd.MultiIndex.from_tuples(robustness.index, names=["backbone x scenario", "dataset"])
    left_out = sum(1 for e in evaluations if (e.id or -1) not in used and (e.corruption_kind or e.dataset_id != e.trained_dataset_id))
    scores, own = (pd.DataFrame.from_dict(table, orient="index").sort_index(axis=1) for table in (transfer, in_domain))
    return EvaluationTables(robustness, scores, own, left_out)


def _mean_drop(severities: list[list[tuple[float | None, float | None]]]) -> float:
    """Mean over severities of (clean - corrupted) / clean in %, each severity's clean and corrupted scores averaged over
    the seeds scored at it; NaN where a clean score is 0 or a score undefined."""
    drops = []
    for pairs in severities:
        clean, corrupted = mean_score([c for c, _ in pairs]), mean_score([x for _, x in pairs])
        drops.append((clean - corrupted) / abs(clean) * 100 if clean else math.nan)
    return mean_score(drops)


def evaluation_lines(tables: EvaluationTables, which: str = "all") -> list[list[str]]:
    """The robustness and transfer tables as rows of text (a header first), `which` of them: all | robustness | transfer."""
    out = []
    if which in ("all", "robustness") and len(tables.robustness):
        lines = [["backbone x scenario", "dataset", *map(str, tables.robustness.columns)]]
        for (row, dataset), values in tables.robustness.iterrows():
            lines.append([row, dataset, *(_fmt(v, True) for v in values)])
        out.append(lines)
    if which in ("all", "transfer") and len(tables.transfer):
        lines = [["backbone x scenario", *map(str, tables.transfer.columns)]]
        for row, values in tables.transfer.iterrows():
            lines.append([row, *(f"{_fmt(v)} ({_fmt(tables.in_domain.loc[row, pair])})" if np.isfinite(v) else "-"
                                 for pair, v in values.items())])
        out.append(lines)
    return out


def to_csv(report: Report) -> pd.DataFrame:
    """One line per row: each column's score, seeds and their std (and interval), the average and gain (and theirs), then
    what the row's label says, one field each."""
    lines = []
    for key in report.table.index:
        info = report.rows[key]
        line: dict[str, Any] = {"row": info.label}
        for c in report.columns:
            line[c.header] = report.table.loc[key, c.label]
            line[f"{c.label} n"] = int(report.seeds.loc[key, c.label])
            line[f"{c.label} std"] = report.std.loc[key, c.label]
            line.update(_interval_fields(report, key, c.label))
            if report.nulls:
                null = report.nulls.get((key, c.label))
                line[f"{c.label} null best"] = max(null) if null else math.nan
                line[f"{c.label} above null"] = report.above_null(key, c.label)
        line[AVERAGE], line[GAIN] = report.table.loc[key, AVERAGE], report.table.loc[key, GAIN]
        for name in (AVERAGE, GAIN):
            line.update(_interval_fields(report, key, name))
        line.update(dict(zip(ROW_KEY, key, strict=True)), set=backbone_set(key[0]))
        cost = report.costs.get(key, {})
        line.update({f"cost {kind}-h": cost.get(kind, 0.0) / 3600 for kind in COST_KINDS})
        line["cost unrecorded"] = int(cost.get("unrecorded", 0))
        line.update(datasets=f"{info.covered}/{info.total}", included=info.included, extension=info.extension,
                    recipe="; ".join(info.recipe) or "study", late_best="; ".join(info.late),
                    inputs=inputs_text([r for (k, _), runs in report.chosen.items() if k == key for r in runs]),
                    inputs_differ="; ".join(f"{label}: {how}" for (k, label), how in report.differ.items() if k == key))
        lines.append(line)
    return pd.DataFrame(lines)


def _interval_fields(report: Report, key: tuple, name: str) -> dict[str, Any]:
    """`<name> ci low`, `ci high` and `nan resamples` of a report with intervals (blank where a cell has none); {} without."""
    if not report.bootstrap:
        return {}
    found = report.intervals.get((key, name))
    if found is None:
        return {f"{name} ci low": math.nan, f"{name} ci high": math.nan, f"{name} nan resamples": pd.NA}
    return {f"{name} ci low": found.low, f"{name} ci high": found.high, f"{name} nan resamples": found.nan_resamples}


def notes(report: Report) -> list[str]:
    """The lines under the table: how cells were chosen, and what each mark in it means."""
    rows = report.rows.values()
    out = [
        "Test scores of the configuration with the best mean validation score over its seeds (n: seeds averaged).",
        f"Gain: mean relative gain (%) over the {BASELINE} linear baseline of the same frozen/unfrozen setting and protocol.",
    ]
    parts = [note for note, level in ((RANDOM_BACKBONE_NOTE, 3), (RANDOM_HEAD_NOTE, 4)) if any(key[level] for key in report.table.index)]
    if parts:
        out.append(f"{'; '.join(parts)}. Such rows say nothing about the pretrained models.")
    if any(info.partial for info in rows):
        out.append(PARTIAL_NOTE if not report.partial else "rows marked k/n datasets lack a dataset; their average and gain cover "
                                                           "the datasets they have (--partial).")
    if any(info.extension for info in rows):
        out.append(EXTENSION_NOTE)
    off = [info for info in rows if info.recipe]
    if off:
        out.append("off-recipe (the study: " + f"{STUDY.epochs} epochs, lr {STUDY.lr:g}, weight decay {STUDY.weight_decay:g}, batch "
                   f"{STUDY.batch_size}, {STUDY_IMAGE_SIZE} px, a {STUDY_HEAD_DEPTH}-block DeiT-B head): "
                   + "; ".join(f"{info.label.split(' (')[0]}: {', '.join(info.recipe)}" for info in off) + ".")
    if any(info.late for info in rows):
        out.append(LATE_NOTE)
    if any(set(report.marks(*cell)) & {"collapsed", "chance"} for cell in report.chosen):
        out.append(HEALTH_NOTE)
    if report.differ:
        out.append(INPUTS_NOTE)
    if report.nulls:
        draws = sorted({len(scores) for scores in report.nulls.values()})
        out.append(f"{NULL_NOTE} Null draws per cell: {', '.join(map(str, draws))}.")
    if any(key[5] != DEFAULT_PROTOCOL for key in report.table.index):
        out.append("Rows of another protocol than medfm's (e.g. the study's) are compared only with their own baseline.")
    out += interval_notes(report)
    return out


def interval_notes(report: Report) -> list[str]:
    """What the intervals are, and each one with undefined resamples, counted (never hidden)."""
    if not report.bootstrap:
        return []
    b = report.bootstrap
    out = [f"[low, high]: {b['level']:g}% percentile bootstrap interval over {b['boot']} resamples of the test set (seed {b['seed']}; "
           "stratified by class, multilabel rows resampled plainly); of the seed-mean when a cell averages seeds (each seed "
           "scored on the same resamples); of the out-of-fold predictions when a cell's runs are cross-validation folds; the gain's "
           "paired with its baseline's resamples. The CSV gives each cell's std over seeds (and folds)."]
    for (key, name), found in report.intervals.items():
        if found.nan_resamples:
            out.append(f"{report.rows[key].label}, {name}: the metric is undefined on {found.nan_resamples} of {found.resamples} "
                       f"resamples (a class or label missing); its interval is over the other {found.defined}.")
    return out


def to_markdown(report: Report) -> str:
    header = ["backbone x scenario"] + [c.header for c in report.columns] + [AVERAGE, GAIN, "cost"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in report.table.index:
        cells = [report.cell(key, c.label) for c in report.columns]
        cells += [report.summary(key, AVERAGE), report.summary(key, GAIN), cost_text(report.costs.get(key, {}))]
        lines.append("| " + " | ".join([report.rows[key].label, *cells]) + " |")
    total = f"Total cost of the grid (every run, each cache's extraction once): {cost_text(report.total_cost)}."
    return "\n".join(lines + [""] + notes(report) + [COST_NOTE, total] + _evaluation_markdown(report)) + "\n"


def _evaluation_markdown(report: Report) -> list[str]:
    """The robustness and transfer sections of report.md, with what their cells mean; [] without `probe eval` scores."""
    if report.evaluations is None:
        return []
    out = []
    for table in evaluation_lines(report.evaluations):
        robustness = table[0][1] == "dataset"
        out += ["", "## Robustness: relative drop (%) under corruption" if robustness else "## Transfer to other datasets", "",
                "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0]), *("| " + " | ".join(line) + " |" for line in table[1:]),
                "", ROBUSTNESS_NOTE if robustness else TRANSFER_NOTE]
    if report.evaluations.left_out:
        out += ["", left_out_note(report.evaluations.left_out)]
    return out


def left_out_note(count: int) -> str:
    return (f"{count} probe eval score{'s are' if count != 1 else ' is'} in neither table: of runs no cell chose (another "
            "configuration or seed), or of corrupted views of another dataset than the run's.")


def gain_chart(report: Report) -> GainChart:
    """What the gain figure shows (`report.figures.draw_gain`): each row's gain and its interval, lowest first; a title
    naming the baseline as it ran (RANDOM weights are said, never called ImageNet); and the rows without a gain, listed
    with why, so none vanishes from the figure silently."""
    gains = report.table[GAIN].dropna().sort_values()
    if not len(gains):
        return GainChart([], [], "", "", empty="No gain to show: " + _why_no_gain(report))
    values = []
    for key, gain in gains.items():
        baseline = key[0] == BASELINE and key[1].endswith("-linear") and gain == 0
        values.append(_value(report, key, GAIN, "0.00 (baseline)" if baseline else f"{gain:+.2f}"))
    notes = []
    if any((key, GAIN) in report.intervals for key in gains.index):
        notes.append(f"error bars: {report.bootstrap['level']:g}% bootstrap intervals, paired with the baseline")
    return GainChart([_chart_row(report, key) for key in gains.index], values, f"Relative gain over {baseline_text(report)}",
                     "relative gain over the baseline of the row's setting (%), mean over datasets", notes + no_gain_notes(report))


def baseline_text(report: Report) -> str:
    """The baselines the gains are over, as they ran: `the ImageNet baseline, deit frozen-linear`, or, when one ran with
    random weights, its label (`RANDOM backbone`) and that it is no ImageNet baseline."""
    included = {key: info.included for key, info in report.rows.items()}
    keys = list(report.table.index)
    bases = [b for b in dict.fromkeys(_baseline_key(keys, k, included) for k in keys if np.isfinite(report.table.loc[k, GAIN])) if b]
    names = ", ".join(report.rows[b].label for b in bases)
    random = [b for b in bases if is_random(b)]
    if not random:
        return f"the ImageNet baseline, {names}"
    if len(random) == len(bases):
        return f"{names}: a baseline with RANDOM weights, not ImageNet pretraining"
    return f"{names} (the RANDOM ones ran with random weights, not ImageNet pretraining)"


def no_gain_notes(report: Report) -> list[str]:
    """`no gain: X, Y (why)`, one line per reason, for the rows of the table without a gain."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key in report.table.index:
        if not np.isfinite(report.table.loc[key, GAIN]):
            by_reason[why_no_gain(report, key)].append(report.rows[key].label)
    return [f"no gain: {', '.join(rows)} ({why})" for why, rows in by_reason.items()]


def why_no_gain(report: Report, key: tuple) -> str:
    """Why a row has no gain (`_gain`): it or its baseline lacks a dataset, it has no baseline, or they share no score."""
    info = report.rows[key]
    if not info.included:
        return f"lacks {info.total - info.covered} of {info.total} datasets; --partial compares the datasets it has"
    freeze = key[1].split("-")[0]
    if key[1] == "zero-shot":
        return f"zero-shot has no {BASELINE} linear baseline"
    keys = list(report.table.index)
    if not any(k[0] == BASELINE and k[1] == f"{freeze}-linear" and k[5] == key[5] for k in keys):
        return f"no {BASELINE} {freeze}-linear row under protocol {key[5]}"
    base_key = _baseline_key(keys, key, {k: i.included for k, i in report.rows.items()})
    if base_key is None:
        return f"its baseline, {BASELINE} {freeze}-linear, lacks a dataset"
    return f"no dataset where both it and {report.rows[base_key].label} have a score (the baseline's not 0)"


def score_chart(report: Report) -> ScoreChart:
    """What the score figure shows (`report.figures.draw_scores`): per dataset column, each row's mean test score with its
    interval (when computed) and the column's test rows; rows in the gain figure's order, top down."""
    order = list(report.table.sort_values(GAIN, ascending=False, na_position="last").index)
    rows = scored_rows(report)
    panels = []
    for c in report.columns:
        values = []
        for key in order:
            score = report.table.loc[key, c.label]
            values.append(_value(report, key, c.label, f"{score:.3f}" if np.isfinite(score) else ""))
        panels.append(Panel(f"{c.label}\n{_rows_text([n for (_, label), n in rows.items() if label == c.label])}", c.metric, values))
    notes = ["points: each cell's mean test score over its seeds, the configuration chosen by validation (as in the table); "
             "n: the column's test rows, counted from the runs' stored predictions."]
    if report.bootstrap:
        notes.append(f"whiskers: {report.bootstrap['level']:g}% bootstrap intervals over the test rows (seed-mean).")
    return ScoreChart([_chart_row(report, key) for key in order], panels, f"Test scores per dataset ({report.runs} runs)", notes)


def scored_rows(report: Report) -> dict[tuple, int | None]:
    """(row key, column label) -> the test rows its chosen runs were scored on, from their stored predictions; None for
    runs that kept none (medfm before 0.2)."""
    out: dict[tuple, int | None] = {}
    for cell, runs in report.chosen.items():
        try:
            out[cell] = len(load_predictions(runs[0].run_dir, "test").ids)
        except MedfmError:
            out[cell] = None
    return out


def _rows_text(counts: list[int | None]) -> str:
    """`n = 480 test rows`; a range when the column's rows differ; `n unknown` without stored predictions."""
    known = sorted({n for n in counts if n is not None})
    if not known:
        return "n unknown (no stored predictions)"
    text = f"n = {known[0]}" if len(known) == 1 else f"n = {known[0]}-{known[-1]} (differs by row)"
    return text + " test rows" + (", some runs kept no predictions" if None in counts else "")


def _value(report: Report, key: tuple, name: str, text: str) -> Value:
    """A cell, average or gain for a figure, with its interval when computed."""
    found = report.intervals.get((key, name))
    return Value(report.table.loc[key, name], found.low if found else None, found.high if found else None, text)


def _chart_row(report: Report, key: tuple) -> Row:
    return Row(report.rows[key].label, key[1], is_random(key))


def _why_no_gain(report: Report) -> str:
    keys = list(report.table.index)
    if not any(k[0] == BASELINE and k[1].endswith("-linear") for k in keys):
        return f"no {BASELINE} linear run to compare with; train one (`probe run --backbone {BASELINE}`)."
    if not any(info.included for info in report.rows.values()):
        return "every row lacks a dataset; `probe report --partial` compares the datasets they have."
    return f"no row shares a freeze setting, protocol and dataset with a {BASELINE} linear row."


def _fmt(value: float, percent: bool = False) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:+.2f}" if percent else f"{value:.4f}"

