"""Every training run writes its per-epoch scalars (train loss, validation primary metric, lr) where TensorBoard reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cache.layout import open_cache
from finetune.train import finetune
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.run import run_probe
from probe.sweep import run_sweep
from tests.probe.caches import make_cache
from tests.tiny import QUIET, tiny_finetune


def scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) per tag, as TensorBoard reads the run folder."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_probe_run_writes_one_point_per_epoch_of_its_history(isolated_outputs: Path) -> None:
    path = make_cache(isolated_outputs / "features" / "deit" / "demo-0123456789ab.h5")
    with open_cache(path, "deit", "demo") as reader:
        record = run_probe(reader, TrainConfig(epochs=3, batch_size=32, lr=1e-3, solver="adamw"), console=QUIET).record
    history = [json.loads(line) for line in Path(record.run_dir, "history.jsonl").read_text().splitlines()]
    found = scalars(record.run_dir)
    assert set(found) == {"train/loss", "val/accuracy", "lr"}
    assert [step for step, _ in found["train/loss"]] == [1, 2, 3]
    assert [v for _, v in found["train/loss"]] == pytest.approx([r["train_loss"] for r in history])
    assert [v for _, v in found["val/accuracy"]] == pytest.approx([r["val_accuracy"] for r in history])
    assert [v for _, v in found["lr"]] == pytest.approx([r["lr"] for r in history])


def test_each_head_of_a_sweep_has_its_own_scalars(isolated_outputs: Path) -> None:
    path = make_cache(isolated_outputs / "features" / "deit" / "demo-0123456789ab.h5")
    configs = [TrainConfig(epochs=2, batch_size=32, lr=lr, solver="adamw") for lr in (1e-4, 1e-2)]
    with open_cache(path, "deit", "demo") as reader:
        outcome = run_sweep(reader, configs, ledger=Ledger(), console=QUIET)
    lrs = [scalars(r.run_dir)["lr"] for r in outcome.records]
    assert [[step for step, _ in points] for points in lrs] == [[1, 2], [1, 2]]
    assert lrs[0][-1][1] < lrs[1][-1][1]  # each head's own learning rate, not the group's


def test_a_finetune_run_writes_its_scalars_as_each_epoch_ends(isolated_outputs: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy machine: see tests/finetune/test_finetune.py
    try:
        result = finetune(tiny_finetune(isolated_outputs / "runs", epochs=2), QUIET)
    finally:
        torch.set_num_threads(threads)
    found = scalars(result.run_dir)
    assert [step for step, _ in found["val/accuracy"]] == [1, 2]
    assert [v for _, v in found["val/accuracy"]] == pytest.approx([h["val"]["accuracy"] for h in result.history])
    assert [v for _, v in found["train/loss"]] == pytest.approx([h["loss"] for h in result.history])
    assert [v for _, v in found["lr"]] == pytest.approx([h["lr"] for h in result.history])
