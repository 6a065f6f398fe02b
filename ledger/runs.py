"""A run folder, written and read one way by both training stages (`training.record` writes it).

Every run folder holds `config.json` (`{"config": ..., "stage", "scenario", "config_key", "task", ...}`),
`predictions.npz`, `metrics.json` and, for single-label tasks, `reliability.png`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from cache.schema import Task
from common.errors import MedfmError
from ledger.records import RunRecord


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


def run_config(record: RunRecord) -> dict[str, Any]:
    """A run's config.json (probe and finetune both keep one in the run folder), or one line saying it is gone."""
    path = Path(record.run_dir or "") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise MedfmError(f"run {record.id}: cannot read its {path}; the run folder was moved or removed") from None


def run_task(record: RunRecord) -> Task:
    """The task a run was scored on, from its config.json."""
    data = run_config(record)
    if "task" not in data:
        raise MedfmError(f"run {record.id}: {Path(record.run_dir or '') / 'config.json'} records no task; retrain it with --force")
    return Task.from_dict(data["task"])
