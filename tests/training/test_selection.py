"""Model selection under `--protocol study` scores each epoch on the rows the study's validation loader served: a seeded
shuffle in batches of 64 with the last partial batch dropped (APTOS: 512 of 549), a new draw every epoch."""

from __future__ import annotations

import json

import numpy as np

from cache.layout import open_cache
from probe.config import TrainConfig
from probe.run import run_probe
from scoring.metrics import primary_score
from tests.probe.caches import make_cache
from tests.tiny import QUIET
from training.recipe import selection_rows


def test_the_study_scores_a_fresh_drop_last_draw_each_epoch_and_medfm_the_whole_split() -> None:
    first, second = selection_rows(549, 0, 1, "study"), selection_rows(549, 0, 2, "study")
    assert len(first) == len(second) == 512 and len(set(first.tolist())) == 512 and first.max() < 549
    assert not np.array_equal(first, second) and np.array_equal(first, selection_rows(549, 0, 1, "study"))  # seeded
    assert not np.array_equal(first, selection_rows(549, 1, 1, "study"))
    assert selection_rows(549, 0, 1, "medfm") is None and selection_rows(40, 0, 1, "study") is None


def test_a_study_probe_selects_on_the_drawn_rows(isolated_outputs) -> None:
    cache = make_cache(isolated_outputs / "c.h5", rows={"train": 144, "val": 100, "test": 48}, separation=0.5)
    with open_cache(cache, None, None) as reader:
        record = run_probe(reader, TrainConfig(epochs=3, batch_size=16, lr=1e-2, protocol="study"), console=QUIET).record
    run_dir = isolated_outputs.parent / record.run_dir
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    with np.load(run_dir / "predictions.npz") as stored:
        labels, logits = stored["val_labels"], stored["val_logits"]
    best = next(h for h in history if h["epoch"] == json.loads((run_dir / "metrics.json").read_text())["best_epoch"])
    rows = selection_rows(100, 0, best["epoch"], "study")
    assert len(rows) == 64
    assert best["val_accuracy"] == primary_score(reader.task, labels[rows], logits[rows])
    assert best["val_accuracy"] != primary_score(reader.task, labels, logits)  # not the whole split's
