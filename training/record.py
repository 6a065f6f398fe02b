"""The end of every training run, probe or finetune alike: its health, its calibration, its files and its ledger row.

`record_run` takes a finished run's ledger row and its validation and test predictions, and
- checks its health (`scoring.health`: collapsed to one class, or not above chance beyond noise) into the row's flags,
- draws the test split's reliability diagram (`reliability.png`, single-label tasks) and, with `calibrate`, fits a
  temperature on validation and adds the test calibration metrics under it (`<name>_calibrated`),
- writes `predictions.npz` and `metrics.json` (with the test split's per-class precision, recall, F1 and confusion
  matrix, `scoring.metrics.per_class`) into the run folder (`ledger.runs`), then appends the row.
So a finetune row carries the same flags and files as a probe row, and a report reads both one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cache.schema import Task
from ledger.predictions import Predictions, save_predictions
from ledger.records import RunRecord
from ledger.runs import METRICS, write_json
from ledger.store import Ledger
from scoring.calibration import calibration_metrics, fit_temperature, reliability_diagram
from scoring.health import Health, check_run
from scoring.metrics import per_class

RELIABILITY = "reliability.png"  # a single-label run's reliability diagram, in its run folder


def record_run(ledger: Ledger, record: RunRecord, task: Task, predictions: dict[str, Predictions], summary: dict[str, Any],
               val_metrics: dict[str, Any], *, health: Health | None = None, calibrate: bool = False,
               reliability: bool = True) -> RunRecord:
    """Finish the run in `record.run_dir` (see the module docstring) and append `record` to the ledger.

    `summary` opens `metrics.json` (best epoch, late flag, what the head's fit adds) and is completed in place with the
    health message (`health`) and the fitted temperature; the validation and test metrics follow it. `health` is checked here unless given (a sweep checks
    its heads together, `scoring.health.check_runs`); `reliability` False skips the diagram (a sweep draws it for its
    best configuration only)."""
    run_dir = Path(record.run_dir or "")
    save_predictions(run_dir, predictions)
    test = predictions["test"]
    health = health or check_run(task, test.labels, test.logits)
    record.collapsed, record.chance = health.collapsed, health.chance
    summary["health"] = health.message
    if task.kind != "multilabel" and (reliability or calibrate):
        temperature = calibrated(run_dir, predictions, record.test_metrics, calibrate, record.dataset_label or record.dataset)
        if temperature is not None:
            summary["calibration_temperature"] = temperature
    write_json(run_dir / METRICS, {**summary, "val": val_metrics, "test": record.test_metrics,
                                   "test_per_class": per_class(task, test.labels, test.logits)})
    ledger.add(record)
    return record


def calibrated(run_dir: Path, predictions: dict[str, Predictions], test_metrics: dict[str, Any], calibrate: bool,
               dataset: str = "") -> float | None:
    """Draw the test split's reliability diagram; with `calibrate`, temperature scaling fitted on validation, the test
    calibration metrics with it applied added to `test_metrics` (`<name>_calibrated`), and the temperature returned."""
    test = predictions["test"]
    temperature = None
    if calibrate:
        temperature = fit_temperature(predictions["val"].labels, predictions["val"].logits)
        scaled = np.asarray(test.logits, dtype=np.float64) / temperature
        test_metrics.update({f"{name}_calibrated": value for name, value in calibration_metrics(test.labels, scaled).items()})
    reliability_diagram(run_dir / RELIABILITY, test.labels, test.logits, temperature, dataset=dataset)
    return temperature
