"""A run folder, written and read one way by both training stages (probe and finetune).

Every run folder holds:
- `config.json`: `RunConfig`, the same shape for both stages: the stage, scenario, backbone, dataset, the `config`
  that decides the result (the ledger row's), the seed, the skip-if-done key, the task, the cache a probe read
  (None for finetune) and what the backbone and head started from;
- `history.jsonl` and `history.csv`: one row per epoch;
- `predictions.npz` (`ledger.predictions`), `metrics.json` (best epoch, flags, validation and test metrics) and, for a
  single-label task, `reliability.png` (`training.record` writes these three and the ledger row).

Run folders of medfm 0.2 wrote a probe's settings flat at the top of `config.json`; `read_config` still reads them.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cache.schema import Task
from common.errors import MedfmError
from ledger.records import RunRecord

CONFIG, HISTORY, METRICS = "config.json", "history.jsonl", "metrics.json"


@dataclass(frozen=True)
class RunConfig:
    """What a run folder says about its run (`config.json`)."""

    stage: str  # probe | finetune
    scenario: str
    backbone: str
    dataset: str
    config: dict[str, Any]  # what decides the result: the ledger row's config
    seed: int
    config_key: str
    task: dict[str, Any]  # `Task.to_dict()`
    cache: str | None = None  # the feature cache a probe read; None for finetune
    cache_fingerprint: str | None = None
    backbone_random_weights: bool = False
    head_init: str = ""  # "", "random" or the head's pretrained weights file (`training.heads.HeadSpec.init`)
    extra: dict[str, Any] = field(default_factory=dict)  # what else the stage records (finetune: the freeze setting)

    @property
    def task_spec(self) -> Task:
        return Task.from_dict(self.task)


def new_run_dir(parent: Path, name: str) -> Path:
    """A fresh folder `parent/name`, or `name-2`, `name-3`... when a run of the same key was saved in the same second
    (a `--force` retrain): an earlier run's head and predictions are never overwritten."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        folder = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_json(path: Path, obj: Any) -> None:
    """Write beside the final name, then rename: a crash leaves the previous file whole, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_config(run_dir: Path, config: RunConfig) -> None:
    write_json(Path(run_dir) / CONFIG, asdict(config))


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The per-epoch rows, as JSON lines and as a flat CSV (nested metrics become `val.accuracy` columns)."""
    with open(Path(run_dir) / HISTORY, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=str) + "\n")
    pd.json_normalize(rows).to_csv(Path(run_dir) / "history.csv", index=False)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_config(record: RunRecord) -> RunConfig:
    """A run's `config.json`, or one line saying which is wrong: the folder is gone, or the file is missing or damaged."""
    folder = Path(record.run_dir or "")
    path = folder / CONFIG
    if not record.run_dir or not folder.is_dir():
        raise MedfmError(f"run {record.id}: its run folder {record.run_dir} is gone (moved or removed); put it back where the "
                         "ledger says, or retrain the run with --force")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # a missing file, bytes that are not UTF-8 (a ValueError) or not JSON
        reason = err.strerror if isinstance(err, OSError) else " ".join(str(err).split())[:200]
        raise MedfmError(f"run {record.id}: cannot read its {path} ({reason}); restore the file, or retrain the run with --force") from None
    if not isinstance(data, dict) or not _task_reads(data.get("task")):
        raise MedfmError(f"run {record.id}: {path} records no task it can read; retrain it with --force")
    if "config" not in data:  # a probe run folder of medfm 0.2: the settings flat beside the rest
        own = {name for name in RunConfig.__dataclass_fields__ if name != "config"}
        data = {**{k: v for k, v in data.items() if k in own}, "config": {k: v for k, v in data.items() if k not in own}}
    if not isinstance(data["config"], dict):
        raise MedfmError(f"run {record.id}: {path} records no settings it can read ('config' is no object); retrain it with --force")
    data.setdefault("stage", record.stage)
    data.setdefault("scenario", record.scenario)
    data.setdefault("backbone", record.backbone)
    data.setdefault("dataset", record.dataset)
    data.setdefault("seed", record.seed)
    data.setdefault("config_key", record.config_key)
    known = {k: v for k, v in data.items() if k in RunConfig.__dataclass_fields__}
    return RunConfig(**known)


def _task_reads(task: Any) -> bool:
    """Whether a config.json's `task` is a task (`Task.from_dict` reads it)."""
    try:
        Task.from_dict(task)
    except (TypeError, ValueError, KeyError, AttributeError, MedfmError):
        return False
    return True


def run_task(record: RunRecord) -> Task:
    """The task a run was scored on, from its config.json."""
    return read_config(record).task_spec
