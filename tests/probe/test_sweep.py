"""`probe sweep`: linear heads train together in one pass per epoch, equal to training each alone; reruns skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache.layout import open_cache
from cache.store import CacheReader
from ledger.store import Ledger
from probe import sweep, train
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.sweep import Grid, expand, run_sweep
from probe.train import train_head
from tests.probe.caches import make_cache

BASE = TrainConfig(epochs=2, batch_size=16, warmup_steps=9, solver="adamw")


def test_twelve_linear_configs_read_the_features_once_per_epoch_and_match_training_alone(tmp_path):
    path = make_cache(tmp_path / "c.h5", separation=1.5)
    grid = Grid(lrs=(1e-4, 1e-3, 1e-2, 3e-2), weight_decays=(0.0, 1e-2, 1e-1))
    with open_cache(path, None, None) as reader:
        configs = expand(reader, grid, BASE)
        assert len(configs) == 12
        outcome = run_sweep(reader, configs, device="cpu")
    assert outcome.trained == 12 and outcome.train_passes == BASE.epochs
    assert outcome.best is not None and outcome.best.val_score == max(r.val_score for r in outcome.records)
    for config, record in zip(configs, outcome.records, strict=True):
        with CacheReader(path) as reader:
            alone = train_head(config, FeatureSource(reader, "pooled", config.batch_size), reader.task, torch.device("cpu"))
        saved = torch.load(f"{record.run_dir}/head.pt", weights_only=True)
        torch.testing.assert_close(saved["linear.weight"], alone.state_dict["linear.weight"], rtol=1e-4, atol=1e-5)
        assert record.val_score == alone.val_score
        assert abs(record.test_metrics["roc_auc"] - alone.test_metrics["roc_auc"]) < 1e-6


def test_rerunning_a_finished_sweep_trains_nothing(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    grid = Grid(heads=("linear", "deit"), lrs=(1e-3,), seeds=(0, 1))
    base = TrainConfig(epochs=1, batch_size=16, head_depth=1, head_preset="deit-t", head_weights="random", solver="adamw")
    with open_cache(path, None, None) as reader:
        configs = expand(reader, grid, base)
        first = run_sweep(reader, configs, device="cpu")
        again = run_sweep(reader, configs, device="cpu")
    assert (first.trained, first.skipped) == (4, 0)
    assert (again.trained, again.skipped, again.train_passes) == (0, 4, 0)
    assert len(Ledger().rows()) == 4
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert {r.scenario for r in first.records} == {"frozen-linear", "frozen-deit"}
    assert first.train_passes == 1 + 2  # both linear heads in one pass; each DeiT head alone


def test_deit_heads_side_by_side_share_one_read_of_the_tokens_and_match_training_alone(tmp_path):
    path = make_cache(tmp_path / "c.h5")
    grid = Grid(heads=("deit",), lrs=(1e-3, 1e-2), seeds=(0, 1))
    base = TrainConfig(epochs=2, batch_size=16, head_depth=1, head_preset="deit-t", head_weights="random")
    with open_cache(path, None, None) as reader:
        configs = expand(reader, grid, base)
        outcome = run_sweep(reader, configs, device="cpu", deit_per_pass=3)
    assert outcome.trained == 4 and outcome.train_passes == 2 * base.epochs  # a pass of 3 heads, then 1
    for config, record in zip(configs, outcome.records, strict=True):
        with CacheReader(path) as reader:
            alone = train_head(config, FeatureSource(reader, config.feature, config.batch_size), reader.task, torch.device("cpu"))
        saved = torch.load(f"{record.run_dir}/head.pt", weights_only=True)
        for name, tensor in alone.state_dict.items():
            torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5)
        assert abs(record.val_score - alone.val_score) < 1e-6


def test_a_sweep_draws_the_reliability_diagram_of_its_best_configuration_only(tmp_path):
    """A figure per head would cost more than training the heads; the best configuration's runs get theirs."""
    path = make_cache(tmp_path / "c.h5")
    with open_cache(path, None, None) as reader:
        outcome = run_sweep(reader, expand(reader, Grid(lrs=(1e-4, 1e-2), seeds=(0, 1)), BASE), device="cpu")
    drawn = {r.id for r in outcome.records if (Path(r.run_dir) / "reliability.png").is_file()}
    assert drawn == {r.id for r in outcome.best_runs} and len(drawn) == 2


def test_deit_per_pass_auto_is_one_head_per_pass_on_the_cpu_and_a_bad_count_is_refused(tmp_path):
    """On CUDA auto measures one head's training step against the free memory (`make gpu-check` runs it there)."""
    import pytest

    from common.errors import MedfmError

    path = make_cache(tmp_path / "c.h5")
    grid = Grid(heads=("deit",), lrs=(1e-3,), seeds=(0, 1))
    base = TrainConfig(epochs=1, batch_size=16, head_depth=1, head_preset="deit-t", head_weights="random")
    with open_cache(path, None, None) as reader:
        configs = expand(reader, grid, base)
        outcome = run_sweep(reader, configs, device="cpu", deit_per_pass="auto")
        assert outcome.trained == 2 and outcome.train_passes == 2 * base.epochs  # each head alone
        with pytest.raises(MedfmError, match="auto or at least 1"):
            run_sweep(reader, configs, device="cpu", deit_per_pass=0, force=True)


@pytest.fixture
def fit_threads(monkeypatch):
    """The torch threads each call of the training loop ran on, on a 2-thread CPU: `seen(module)` records the calls of
    `module.fit`; the threads are given back after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []

    def recording(module):
        real_fit = module.fit

        def fit(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real_fit(*args, **kwargs)

        monkeypatch.setattr(module, "fit", fit)
        return seen

    yield recording
    assert torch.get_num_threads() == 2  # what the run found, given back
    torch.set_num_threads(threads)


def test_a_small_stack_of_linear_heads_trains_on_one_cpu_thread_and_gives_the_threads_back(tmp_path, monkeypatch, fit_threads):
    """Stacked heads' small operations cross torch's grain for splitting across threads, which costs more than they do;
    a stack too large for one core keeps the threads."""
    seen = fit_threads(sweep)
    with open_cache(make_cache(tmp_path / "c.h5"), None, None) as reader:
        configs = expand(reader, Grid(lrs=(1e-3, 1e-2)), BASE)
        run_sweep(reader, configs, device="cpu")
        monkeypatch.setattr(train, "ONE_THREAD_PARAMETERS", 10)
        run_sweep(reader, configs, device="cpu", force=True)
    assert seen == [1, 2] and torch.get_num_threads() == 2


def test_a_lone_linear_head_trains_on_one_cpu_thread_too(tmp_path, monkeypatch, fit_threads):
    """`probe run`'s head: on a busy machine its forward's threads wait for each other's core as a stack's do."""
    seen = fit_threads(train)
    with open_cache(make_cache(tmp_path / "c.h5"), None, None) as reader:
        source = FeatureSource(reader, "pooled", 16)
        train_head(BASE, source, reader.task, torch.device("cpu"))
        monkeypatch.setattr(train, "ONE_THREAD_PARAMETERS", 10)
        train_head(BASE, source, reader.task, torch.device("cpu"))
    assert seen == [1, 2] and torch.get_num_threads() == 2
