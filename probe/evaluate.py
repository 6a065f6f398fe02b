"""`probe eval`: score a run's saved head on another cache of the same features (docs/robustness.md §2).

A probe run keeps its best head (`head.pt`, standardization buffers included) and its config. Scoring it elsewhere
takes the run's feature (block, pooled or tokens) from the other cache, feeds it through the head exactly as the
run's test split was scored (`probe.train.predict`, fp32), and scores the outputs with the run's task. On the run's
own cache this reproduces its stored test metric; on a corrupted test view (`<stem>+<kind>-<severity>.h5`) it
measures robustness; on another dataset, transfer.

Two caches hold comparable features when `cache.schema.feature_settings` of both are equal. When the cache's classes
differ from the head's, the cache's `label_maps[<the head's dataset>]` maps them: single-label rows become the head's
class indices (rows of classes without a counterpart are dropped only with `allow_unmapped`); a multilabel head's
outputs are scored against the own labels mapped onto them (partner labels with no source are left unscored).
Each result is one ledger row (`ledger.store.EvaluationRecord`), replaced when the same run is scored on the same
cache again.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.layout import flatten_settings
from cache.schema import CacheMeta, Task, feature_settings
from cache.store import CacheReader
from common.checkpoints import load_into
from common.errors import MedfmError
from common.runtime import resolve_device
from ledger.records import EvaluationRecord, RunRecord, cache_identity
from ledger.runs import RunConfig, read_config
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.heads import get_head
from probe.stack import stack_heads
from probe.train import make_head, predict
from scoring.metrics import compute_metrics
from training.recipe import STUDY


@dataclass(frozen=True)
class SavedRun:
    """A finished probe run as `probe eval` needs it: its ledger row, its config.json and its head's task."""

    record: RunRecord
    config: RunConfig
    task: Task

    @property
    def run_dir(self) -> Path:
        return Path(self.record.run_dir or "")

    @property
    def cache(self) -> Path:
        return Path(self.config.cache or "")


def load_run(ledger: Ledger, run: str) -> SavedRun:
    """The probe run named by its ledger id (as `probe compare` takes it) or by its run folder."""
    if re.fullmatch(r"\d+", run):
        found = ledger.rows(id=int(run))
    else:
        folder = Path(run).expanduser().resolve()
        found = [r for r in ledger.rows(stage="probe") if r.run_dir and Path(r.run_dir).resolve() == folder]
    if not found:
        raise MedfmError(f"no run {run} in the ledger {ledger.path}; name a run by its ledger id (the ledger's `id` column) or "
                         "its run folder (which `probe run` prints)")
    record = found[-1]
    if record.stage != "probe":
        raise MedfmError(f"run {record.id} was trained end to end (finetune); probe eval scores heads trained on cached features")
    spec = get_head(record.head)
    if not spec.trains:
        raise MedfmError(f"run {record.id} is a {record.head} probe, which keeps no trained head; probe eval scores trained heads "
                         "(linear, deit)")
    config = read_config(record)  # one clear error when the run folder is gone
    task = config.task_spec
    if not (Path(record.run_dir or "") / "head.pt").is_file():
        raise MedfmError(f"run {record.id}: its head ({record.run_dir}/head.pt) is missing; retrain it with --force")
    return SavedRun(record, config, task)


def check_same_features(run: SavedRun, run_meta: CacheMeta, run_fingerprint: str, reader: CacheReader) -> None:
    """One line unless `reader` holds features made as the run's cache's were (`feature_settings`)."""
    if reader.fingerprint == run_fingerprint:
        return
    if not run_meta.settings or not reader.meta.settings:
        unrecorded = run.cache if not run_meta.settings else reader.path
        raise MedfmError(f"{unrecorded} records no extraction settings, so whether {reader.path.name} holds features made as "
                         f"run {run.record.id}'s were cannot be checked; extract both with `extract run`")
    ours, theirs = (flatten_settings(feature_settings(meta.settings)) for meta in (run_meta, reader.meta))
    differing = [key for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]  # e.g. transform.size
    if differing:
        shown = "; ".join(f"{key}: {str(ours.get(key))[:40]} vs {str(theirs.get(key))[:40]}" for key in differing)
        raise MedfmError(f"{reader.path.name} holds features made otherwise than run {run.record.id}'s cache ({shown}); "
                         "a head scores only features of the same backbone and settings")


@dataclass(frozen=True)
class LabelPairing:
    """How a cache's labels and the head's outputs are paired for scoring.

    Single-label: `targets[i]` is the head's class index of the cache's class i, -1 where it has none.
    Multilabel: scored column k pairs the cache's label `sources[k]` with the head's output `targets[k]`.
    """

    multilabel: bool
    targets: np.ndarray
    sources: np.ndarray
    unmapped: tuple[str, ...]  # the cache's classes or labels without a counterpart
    unscored: tuple[str, ...]  # the head's labels no cache label maps to (multilabel)
    task: Task  # what the paired outputs are scored as


def pair_labels(head: Task, trained_on: str, meta: CacheMeta, allow_unmapped: bool) -> LabelPairing:
    """The pairing of `meta`'s task with the head's (trained on dataset `trained_on`): identity when the class names
    agree, else through `meta.label_maps[trained_on]`."""
    own = meta.task
    if (head.kind == "multilabel") != (own.kind == "multilabel"):
        raise MedfmError(f"the head predicts a {head.kind} task and the cache's {meta.dataset.name} is {own.kind}: "
                         "a head scores only a task of its kind (single-label or multilabel)")
    if own.class_names == head.class_names:
        mapping: dict[str, str | None] = dict(zip(own.class_names, head.class_names, strict=True))
    elif trained_on in meta.label_maps:
        mapping = meta.label_maps[trained_on]
    else:
        raise MedfmError(f"the head was trained on {trained_on} ({', '.join(head.class_names)}) and the cache holds "
                         f"{meta.dataset.name} ({', '.join(own.class_names)}): their classes differ and the cache has no label "
                         f"map of {meta.dataset.name} onto {trained_on}")
    strangers = sorted({str(t) for t in mapping.values() if t is not None and t not in head.class_names})
    if strangers:
        raise MedfmError(f"the label map of {meta.dataset.name} onto {trained_on} names {', '.join(strangers)}, not classes of "
                         f"{trained_on} ({', '.join(head.class_names)})")
    unmapped = tuple(c for c in own.class_names if mapping.get(c) is None)
    if unmapped and not allow_unmapped:
        rows = "labels are ignored" if head.kind == "multilabel" else "test rows are dropped"
        raise MedfmError(f"the label map of {meta.dataset.name} onto {trained_on} leaves {', '.join(unmapped)} without a "
                         f"counterpart; pass --allow-unmapped to score without them (their {rows})")
    index = {name: i for i, name in enumerate(head.class_names)}
    if head.kind != "multilabel":
        targets = np.array([index[mapping[c]] if mapping.get(c) is not None else -1 for c in own.class_names], dtype=np.int64)
        return LabelPairing(False, targets, np.arange(len(own.class_names)), unmapped, (), head)
    pairs = [(j, index[mapping[c]]) for j, c in enumerate(own.class_names) if mapping.get(c) is not None]
    if not pairs:
        raise MedfmError(f"the label map of {meta.dataset.name} onto {trained_on} maps none of its labels: nothing to score")
    sources, targets = np.array([j for j, _ in pairs], dtype=np.int64), np.array([t for _, t in pairs], dtype=np.int64)
    unscored = tuple(name for i, name in enumerate(head.class_names) if i not in targets)
    task = Task("multilabel", tuple(head.class_names[t] for t in targets), head.primary_metric)
    return LabelPairing(True, targets, sources, unmapped, unscored, task)


def apply_pairing(mapping: LabelPairing, labels: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The cache's labels and the head's logits paired for scoring, and how many rows were dropped (unmapped classes)."""
    if mapping.multilabel:
        return labels[:, mapping.sources], logits[:, mapping.targets], 0
    targets = mapping.targets[np.asarray(labels, dtype=np.int64)]
    keep = targets >= 0
    return targets[keep], logits[keep], int((~keep).sum())


def head_outputs(run: SavedRun, reader: CacheReader, device: str = "auto", max_ram: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The run's head on every valid test row of `reader`: (the cache's labels, logits [N, outputs]), computed as the
    run's own test split was (`probe.train.predict`, fp32)."""
    if "test" not in reader.splits:
        raise MedfmError(f"{reader.path} has no test split to score (it holds {', '.join(reader.splits)})")
    c = run.config.config
    config = TrainConfig(head=c["head"], feature=c["feature"], batch_size=int(c.get("batch_size", STUDY.batch_size)), seed=run.config.seed,
                         head_depth=int(c.get("head_depth", 12)), head_preset=c.get("head_preset", "deit-b"),
                         head_weights="random", protocol=c.get("protocol", "medfm"))  # the weights come from head.pt
    source = FeatureSource(reader, config.feature, config.batch_size, max_ram)
    head = make_head(config, source.row_shape, run.task.num_outputs)
    load_into(head, run.run_dir / "head.pt", f"run {run.record.id}'s {run.record.head} head",
              "it is not the head this run saved; retrain the run with --force")
    dev = resolve_device(device)
    logits, labels = predict(stack_heads([head]).to(dev), source, "test", reader.task, dev, None)
    return labels, logits[0]


def corrupted_views(clean: Path) -> list[Path]:
    """The corrupted test views beside a clean cache: `<stem>+<kind>-<severity>.h5`."""
    views = sorted(clean.parent.glob(f"{clean.stem}+*.h5"))
    if not views:
        raise MedfmError(f"no corrupted views of {clean.name} beside it ({clean.stem}+<kind>-<severity>.h5); "
                         "make them with `extract run --corrupt KIND:SEVERITY`")
    return views


def evaluate(run: SavedRun, reader: CacheReader, ledger: Ledger, *, allow_unmapped: bool = False, device: str = "auto",
             max_ram: int | None = None) -> EvaluationRecord:
    """Score the run's head on `reader`'s test split and record it in the ledger (replacing an earlier score of the
    same run on the same cache)."""
    if not run.cache.is_file():
        raise MedfmError(f"run {run.record.id}'s cache {run.cache} is gone; probe eval needs it to check that the features "
                         "compare (extract it again with the run's settings)")
    with CacheReader(run.cache) as own:
        check_same_features(run, own.meta, own.fingerprint, reader)
    mapping = pair_labels(run.task, run.record.dataset, reader.meta, allow_unmapped)
    labels, logits = head_outputs(run, reader, device, max_ram)
    labels, logits, dropped = apply_pairing(mapping, labels, logits)
    if not len(labels):
        raise MedfmError(f"none of the test rows of {reader.path.name} belongs to a class the head knows: nothing to score")
    metrics: dict[str, Any] = compute_metrics(mapping.task, labels, logits)
    if mapping.unmapped or mapping.unscored:
        metrics["label_map"] = {"unmapped": list(mapping.unmapped), "unscored": list(mapping.unscored)}
    score = metrics.get(mapping.task.primary_metric)
    identity = cache_identity(reader.meta)
    corruption = reader.meta.corruption
    record = EvaluationRecord(
        run_id=int(run.record.id or 0), run_key=run.record.config_key, trained_dataset_id=run.record.dataset_id,
        dataset=reader.meta.dataset.name, dataset_id=identity.id, dataset_label=identity.label,
        corruption_kind=str(corruption.get("kind", "")), corruption_severity=corruption.get("severity"),
        cache=str(reader.path), cache_fingerprint=reader.fingerprint, primary_metric=mapping.task.primary_metric,
        score=float(score) if score is not None else None, metrics=metrics, scored_rows=len(labels), dropped_rows=dropped,
    )
    ledger.add_evaluation(record)
    return record


def describe(run: SavedRun, record: EvaluationRecord) -> list[str]:
    """What `probe eval` prints of one evaluation: the score, beside the run's own test score, and what the map left out."""
    metric, clean = record.primary_metric, run.record.test_primary
    where = Path(record.cache).name + (f" ({record.corruption_kind}, severity {record.corruption_severity})" if record.corruption_kind else "")
    score = "-" if record.score is None or not math.isfinite(record.score) else f"{record.score:.4f}"
    drop = ""
    if record.corruption_kind and record.score is not None and clean and math.isfinite(clean):
        drop = f", {100 * (clean - record.score) / abs(clean):+.2f}% relative drop"
    own = "-" if clean is None or not math.isfinite(clean) else f"{clean:.4f}"
    lines = [f"run {run.record.id} ({run.record.backbone} {run.record.scenario}, trained on {run.record.dataset_label or run.record.dataset}, "
             f"test {metric} {own}) on {where}: {metric} {score} over {record.scored_rows} rows{drop}"]
    unmapped = record.metrics.get("label_map", {})
    if record.dropped_rows:
        lines.append(f"  {record.dropped_rows} test rows of {', '.join(unmapped.get('unmapped', []))} dropped: no counterpart "
                     f"in {run.record.dataset}")
    elif unmapped.get("unmapped"):
        lines.append(f"  labels {', '.join(unmapped['unmapped'])} ignored: no counterpart in {run.record.dataset}")
    if unmapped.get("unscored"):
        lines.append(f"  the head's labels {', '.join(unmapped['unscored'])} not scored: no label of {record.dataset} maps to them")
    lines += [f"  note: {w}" for w in record.metrics.get("warnings", [])]
    return lines
