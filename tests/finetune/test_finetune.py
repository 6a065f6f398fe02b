"""finetune end to end on tiny models: fitting, exact resume after a kill, DDP == one process, freeze policies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cache.schema import Task
from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from finetune import train as finetune_train
from finetune.cli import main
from finetune.model import FreezePolicy, build_model
from finetune.train import CHECKPOINT, FinetuneConfig, finetune
from ledger.predictions import load_predictions
from ledger.runs import read_history
from ledger.store import Ledger
from report.table import make_report
from scoring.health import check_run
from tests.conftest import REPO, cli
from tests.extract import killable
from tests.layouts import image
from tests.tiny import TINY_RESNET, TINY_VIT_DEEP, run_main
from tests.tiny import tiny_finetune as tiny

TIMM_VIT = "timm:vit_small_patch16_224"  # a backbone named by its library, built tiny through TINY_VIT_DEEP


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models train fastest on one thread, here and in the subprocesses: on a busy machine two
    OpenMP threads spin-wait on every tiny op and make these tests 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def cli_args(cfg: FinetuneConfig) -> list[str]:
    """The `finetune run` options that reproduce `cfg`."""
    args = ["run", "--backbone", cfg.backbone, "--dataset", cfg.dataset, "--head", cfg.head, "--weights", cfg.weights, "--image-size", str(cfg.image_size), "--batch-size", str(cfg.batch_size),
            "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps), "--epochs", str(cfg.epochs),
            "--workers", str(cfg.workers), "--augment" if cfg.augment else "--no-augment", "--head-depth", str(cfg.head_depth),
            "--head-preset", cfg.head_preset, "--norm", cfg.norm, "--head-weights", cfg.head_weights, "--device", cfg.device, "--out", str(cfg.out)]
    args += [a for k, v in cfg.dataset_options.items() for a in ("--opt", f"{k}={v}")]
    args += [a for flag, v in (("--freeze", cfg.freeze), ("--adapter", cfg.adapter), ("--adapter-lr", cfg.adapter_lr)) if v is not None
             for a in (flag, str(v))]
    return args + [a for k, v in cfg.overrides.items() for a in ("--override", f"{k}={v}")]


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def run_dir_of(out: Path) -> Path:
    (run_dir,) = (out / "finetune").iterdir()
    return run_dir


def test_tiny_model_fits_its_training_set_and_lands_in_the_ledger(isolated_outputs: Path) -> None:
    cfg = tiny(isolated_outputs / "runs", epochs=10)
    result = finetune(cfg)

    last = result.history[-1]
    assert last["train"]["accuracy"] >= 0.9, result.history
    assert last["loss"] < result.history[0]["loss"] / 3
    (row,) = Ledger().rows(stage="finetune")
    assert (row.scenario, row.backbone, row.dataset, row.head) == ("unfrozen-linear", "deit", "demo", "linear")
    assert row.test_primary == pytest.approx(result.test_score) and row.val_score == pytest.approx(result.val_score)
    assert row.backbone_random and not row.head_random and row.config["freeze"] == "none"
    assert row.device == "cpu" and row.cost_seconds == pytest.approx(row.total_seconds) and row.extract_seconds is None  # its cost
    train_images = len(json.loads((result.run_dir / "splits.json").read_text())["train"])
    assert row.throughput == pytest.approx(train_images * len(result.history) / row.train_seconds)
    assert {p.name for p in result.run_dir.iterdir()} >= {"best.pt", "config.json", "splits.json", "history.jsonl", "metrics.json",
                                                           "predictions.npz", "reliability.png"}  # the files a probe run keeps
    assert not (result.run_dir / CHECKPOINT).exists()
    config = json.loads((result.run_dir / "config.json").read_text())  # the shape a probe run folder's has (ledger.runs)
    assert (config["stage"], config["scenario"], config["config_key"], config["cache"]) == ("finetune", "unfrozen-linear", row.config_key, None)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert (row.collapsed, row.chance, metrics["health"]) == (False, False, "")  # checked, as a probe run's are (scoring.health)
    matrix = metrics["test_per_class"]["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == len(stored_ids := load_predictions(result.run_dir, "test").ids) and len(stored_ids) > 0
    stored = load_predictions(result.run_dir, "test")  # kept with the ids: intervals later, no retraining
    assert len(stored.ids) == len(stored.labels) == len(stored.logits) and (stored.logits.argmax(1) == stored.labels).mean() == pytest.approx(
        result.test_metrics["accuracy"])
    table = make_report(Ledger()).table  # what `probe report` prints
    assert table.loc[("deit", "unfrozen-linear", "finetune", True, False, "medfm"), "demo"] == pytest.approx(result.test_score)
    assert finetune(cfg).trained is False  # the same configuration is not trained twice
    assert len(Ledger().rows(stage="finetune")) == 1


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # killable-demo (demo's images) pauses at the second load of a train image: in epoch 2, after epoch 1's checkpoint
    killed = tiny(tmp_path / "killed", epochs=5, augment=True, dataset="killable-demo")  # augmentation: its stream replays too
    train_image = int(get_dataset("demo", None, per_class=8).splits["train"].ids[3].removeprefix("demo-"))
    marker = tmp_path / "paused"
    env = {**os.environ, killable.PAUSE_ENV: f"{train_image}#2:{marker}", "PYTHONPATH": str(REPO)}
    script = "from tests.extract import killable; from finetune.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", script, *cli_args(killed)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    run_dir = run_dir_of(killed.out)
    stopped_at = torch.load(run_dir / CHECKPOINT, weights_only=True)["epoch"]
    assert stopped_at == 1  # killed in epoch 2: epoch 1 checkpointed, nothing of epoch 2 kept
    with pytest.raises(MedfmError, match="--resume"):
        finetune(killed)

    trained_epochs: list[int] = []  # each epoch trained draws its augmentation once: count them
    draw = finetune_train.draw_epoch
    monkeypatch.setattr(finetune_train, "draw_epoch", lambda loader, seed, epoch: (trained_epochs.append(epoch), draw(loader, seed, epoch)))
    resumed = finetune(replace(killed, resume=True))
    assert trained_epochs == list(range(stopped_at, killed.epochs))  # it went on from the checkpoint, not from epoch 1
    assert len(list(resumed.run_dir.glob("events.out.tfevents.*"))) == 1  # the killed attempt's file replaced, not read beside
    events = EventAccumulator(str(resumed.run_dir))  # TensorBoard's view: each epoch once, the checkpoint's rewritten
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == list(range(1, killed.epochs + 1))
    whole = finetune(replace(killed, out=tmp_path / "whole"))

    assert without_timings(resumed.history) == without_timings(whole.history)
    assert resumed.test_metrics == whole.test_metrics
    best_resumed, best_whole = (torch.load(r.run_dir / "best.pt", weights_only=True) for r in (resumed, whole))
    assert all(torch.equal(best_resumed[k], best_whole[k]) for k in best_whole)


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """gloo on CPU; 7 val images over 2 ranks: the sampler's padding duplicate must not be scored.
    The train split's mean/std (--norm dataset) is computed by each rank alike."""
    cfg = tiny(tmp_path / "two", epochs=2, dataset_options={"per_class": 9}, norm="dataset")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, cli("finetune"), *cli_args(cfg)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = {"history": read_history(run_dir_of(cfg.out)), **json.loads((run_dir_of(cfg.out) / "metrics.json").read_text())}

    one = finetune(replace(cfg, out=tmp_path / "one"))

    assert len(Ledger(cfg.out / "results.sqlite").rows()) == 1  # only rank 0 records
    for h1, h2 in zip(one.history, two["history"], strict=True):
        assert h2["loss"] == pytest.approx(h1["loss"], abs=1e-5)
        for split in ("train", "val"):
            for name in ("accuracy", "roc_auc", "macro_recall"):
                assert h2[split][name] == pytest.approx(h1[split][name], abs=1e-6), (split, name)
    for name in ("accuracy", "roc_auc", "macro_recall"):
        assert two["test"][name] == pytest.approx(one.test_metrics[name], abs=1e-6)
    # Weights within 1e-4: the ranks' summation order differs at float rounding, and AdamW turns rounding-level
    # gradients (e.g. of attention key biases, whose true gradient is zero) into steps of up to lr each.
    w1, w2 = (torch.load(d / "best.pt", weights_only=True) for d in (one.run_dir, run_dir_of(cfg.out)))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.parametrize(
    ("backbone", "overrides", "freeze", "head", "trained_prefixes", "scenario"),
    [
        ("deit", {**TINY_VIT_DEEP, "depth": 4}, "last-2", "deit", ("blocks.2.", "blocks.3."), "last2-deit"),
        ("resnet152", TINY_RESNET, "last-1", "linear", ("layer4.",), "last1-linear"),
        ("resnet152", TINY_RESNET, "all", "linear", (), "frozen-linear"),
        (TIMM_VIT, TINY_VIT_DEEP, "last-1", "linear", ("blocks.2.",), "last1-linear"),
        (TIMM_VIT, TINY_VIT_DEEP, "none", "deit", ("",), "unfrozen-deit"),
    ],
)
def test_freeze_leaves_every_other_backbone_tensor_bit_identical(
    tmp_path: Path, backbone: str, overrides: dict, freeze: str, head: str, trained_prefixes: tuple[str, ...], scenario: str,
) -> None:
    """Frozen weights never move, and frozen BatchNorm statistics never drift (frozen parts run in eval mode).
    Partial unfreezing is its own scenario (last<K>-<head>), never counted as the study's unfrozen one."""
    start = create_backbone(backbone, "random", image_size=32, **overrides).model.state_dict()
    weights = tmp_path / "start.pth"
    torch.save(start, weights)
    cfg = tiny(tmp_path / "runs", backbone=backbone, weights=str(weights), overrides=overrides, freeze=freeze, head=head,
               epochs=1, lr=1e-2, warmup_steps=0)
    result = finetune(cfg)

    assert result.scenario == scenario
    after = torch.load(result.run_dir / "best.pt", weights_only=True)
    moved = {name for name, before in start.items() if not torch.equal(after[f"backbone.model.{name}"], before)}
    assert {name for name in moved if not name.startswith(trained_prefixes)} == set()
    assert bool(moved) == bool(trained_prefixes)


def test_last_k_of_a_timm_model_counts_its_own_blocks() -> None:
    """K=1 trains exactly the last of the model's own blocks and the head; the stem, earlier blocks and final norm stay."""
    backbone = create_backbone(TIMM_VIT, "random", image_size=32, **TINY_VIT_DEEP)
    assert backbone.num_layers == 3
    for freeze, blocks in (("last-1", (2,)), ("last-3", (0, 1, 2)), ("all", ())):
        model = build_model(backbone, "linear", 4, FreezePolicy.parse(freeze))
        trained = {f"backbone.model.blocks.{i}.{n}" for i in blocks for n, _ in backbone.blocks[i].named_parameters()}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trained | {"head.linear.weight", "head.linear.bias"}
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
            sum(p.numel() for i in blocks for p in backbone.blocks[i].parameters()) + sum(p.numel() for p in model.head.parameters()))


@pytest.mark.parametrize(("freeze", "message"), [("last-4", "--freeze last-4: this backbone has only 3 blocks; use last-3 or none"),
                                                 ("last--1", "--freeze must be none, all or last-K with K >= 1")])
def test_a_bad_k_for_a_timm_model_is_one_line_before_any_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, freeze: str,
                                                                  message: str) -> None:
    code, _, err = run_main(main, cli_args(tiny(tmp_path / "runs", backbone=TIMM_VIT, freeze=freeze)), monkeypatch)
    lines = [line for line in err.strip().splitlines() if not line.startswith(f"{TIMM_VIT}: pooled")]  # what it reads: said first
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.rglob("*.pt"))  # nothing trained, no run started


def test_freeze_policy_is_checked_against_the_backbone(tmp_path: Path) -> None:
    assert FreezePolicy.parse("last-3").trainable_blocks == 3
    for bad in ("last-0", "last-x", "some"):
        with pytest.raises(MedfmError, match="--freeze"):
            FreezePolicy.parse(bad)
    with pytest.raises(MedfmError, match="only 3 blocks"):
        finetune(tiny(tmp_path, freeze="last-4"))


@pytest.mark.parametrize(("bad", "flag"), [(dict(norm="imagenet"), "--norm"), (dict(in_chans=2), "--in-chans"),
                                           (dict(image_size=8), "--image-size"), (dict(norm="study"), "--norm study"),
                                           (dict(interpolation="lanczos"), "--interpolation")])
def test_bad_input_settings_fail_before_any_training(tmp_path: Path, bad: dict, flag: str) -> None:
    with pytest.raises(MedfmError, match=flag):
        finetune(tiny(tmp_path, **bad))  # --norm study: the demo set is not one of the study's datasets
    assert not list(tmp_path.rglob("*.pt"))


def test_the_same_file_names_under_another_root_are_another_run(tmp_path: Path) -> None:
    """The dataset root is part of a finetune run's identity: other images are never answered with "already finished"."""
    for root, value in (("a", 60), ("b", 200)):
        for cls in ("no", "yes"):
            for i in range(6):
                image(tmp_path / root / cls / f"{i}.png", value if cls == "no" else 255 - value, size=32)
    first = finetune(tiny(tmp_path / "runs", dataset="imagefolder", root=tmp_path / "a", dataset_options={}, epochs=1, batch_size=2))
    other = finetune(tiny(tmp_path / "runs", dataset="imagefolder", root=tmp_path / "b", dataset_options={}, epochs=1, batch_size=2))
    assert first.trained and other.trained and first.run_dir != other.run_dir
    assert len(Ledger(tmp_path / "runs" / "results.sqlite").rows()) == 2


@pytest.mark.parametrize(("change", "extra", "fragment"), [
    (dict(lr=float("nan")), [], "--lr must be a positive number, got nan"),
    (dict(lr=float("inf")), [], "--lr must be a positive number, got inf"),
    (dict(weight_decay=float("nan")), ["--weight-decay", "nan"], "--weight-decay must be a non-negative number, got nan"),
    ({}, ["--grad-clip", "nan"], "--grad-clip must be a positive number, got nan"),
    (dict(workers=-1), [], "--workers must be 0 (decode in the main process) or more, got -1"),
], ids=["lr-nan", "lr-inf", "wd-nan", "clip-nan", "workers-negative"])
def test_non_finite_settings_and_negative_workers_are_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict, extra: list[str], fragment: str) -> None:
    code, out, err = run_main(main, [*cli_args(tiny(tmp_path / "runs", **change)), *extra], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "runs").exists()  # no orphan run folder


def test_an_image_size_off_the_patch_grid_is_refused_naming_the_nearest_sizes(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="--image-size 36 does not fit deit's 8-pixel patches: the last 4 .* use --image-size 32 or 40"):
        finetune(tiny(tmp_path, image_size=36))  # TINY_VIT_DEEP: 8-pixel patches
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.rglob("*.pt"))  # no run folder started


@pytest.mark.filterwarnings("ignore:DeiT head weights not found")
def test_a_random_deit_head_on_a_pretrained_backbone_is_labelled_so_and_a_last_epoch_best_is_flagged(tmp_path: Path) -> None:
    """The DeiT head's ImageNet weights are missing, the backbone's are a file: RANDOM head, not RANDOM backbone. One
    epoch: its best epoch is its last, flagged in the ledger, in one line at the end of the run and in the report."""
    import io

    from rich.console import Console

    weights = tmp_path / "start.pth"
    torch.save(create_backbone("deit", "random", image_size=32, **TINY_VIT_DEEP).model.state_dict(), weights)
    said = io.StringIO()
    result = finetune(tiny(tmp_path / "runs", weights=str(weights), head="deit", head_weights="default", epochs=1),
                      Console(file=said, width=300))
    (row,) = Ledger(tmp_path / "runs" / "results.sqlite").rows()
    assert (row.backbone_random, row.head_random, result.head_random) == (False, True, True)
    assert row.late_best and "note: the best validation epoch is 1 of 1, in the last tenth" in said.getvalue()
    report = make_report(Ledger(tmp_path / "runs" / "results.sqlite"))
    key = ("deit", "unfrozen-deit", "finetune", False, True, "medfm")
    assert report.rows[key].label.startswith("deit unfrozen-deit (RANDOM head, ")
    assert report.cell(key, "demo").endswith("(n=1, late)")


def test_a_finetune_run_and_a_cache_of_the_same_data_share_a_dataset_column(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from cache.layout import open_cache
    from extract.runner import ExtractConfig, extract
    from ledger.records import cache_identity

    cfg = tiny(tmp_path / "runs", epochs=1)
    cache = extract(ExtractConfig(backbone="deit", dataset="demo", weights="random", image_size=32, batch_size=64, workers=0,
                                  overrides=TINY_VIT_DEEP, dataset_options=cfg.dataset_options, out=tmp_path / "features"),
                    Console(file=io.StringIO())).path
    finetune(cfg)
    (row,) = Ledger(tmp_path / "runs" / "results.sqlite").rows()
    with open_cache(cache, "deit", "demo") as reader:
        identity = cache_identity(reader.meta)
    assert (identity.id, identity.label) == (row.dataset_id, row.dataset_label) == (row.dataset_id, "demo")
    assert row.dataset_inputs["image_size"] == 32
    assert finetune(replace(cfg, image_size=24)).trained  # the same images at another size: the same column, fed otherwise
    rows = Ledger(tmp_path / "runs" / "results.sqlite").rows()
    assert len({r.dataset_id for r in rows}) == 1 and sorted(r.dataset_inputs["image_size"] for r in rows) == [24, 32]


def test_seeds_run_one_finetune_per_seed_each_its_own_ledger_row_and_the_report_averages_them(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny(tmp_path / "runs", epochs=1)
    code, _, err = run_main(main, [*cli_args(cfg), "--seeds", "0,x"], monkeypatch)
    assert code == 2 and err.strip() == "error: --seeds takes comma-separated integers such as 0,1,2, got '0,x'"
    code, out, err = run_main(main, [*cli_args(cfg), "--seeds", "0,1"], monkeypatch)
    assert code == 0, err
    rows = Ledger(tmp_path / "runs" / "results.sqlite").rows()
    assert sorted(r.seed for r in rows) == [0, 1] and rows[0].config == rows[1].config and rows[0].config_key != rows[1].config_key
    said = " ".join(out.split())
    assert "demo (seed 1): val accuracy" in said and "mean over 2 seeds (0, 1): test accuracy" in said
    key = ("deit", "unfrozen-linear", "finetune", True, False, "medfm")
    assert make_report(Ledger(tmp_path / "runs" / "results.sqlite")).seeds.loc[key, "demo"] == 2


def test_a_finetune_that_learns_nothing_is_flagged_like_a_probe_run(isolated_outputs: Path) -> None:
    """A learning rate that moves nothing leaves the random model's predictions: the row says so (scoring.health)."""
    result = finetune(tiny(isolated_outputs / "runs", epochs=1, lr=1e-12, warmup_steps=0))
    (row,) = Ledger(isolated_outputs / "runs" / "results.sqlite").rows(stage="finetune")
    stored = load_predictions(result.run_dir, "test")
    expected = check_run(Task.from_dict(json.loads((result.run_dir / "config.json").read_text())["task"]),
                         stored.labels, stored.logits)
    assert row.collapsed or row.chance
    assert (row.collapsed, row.chance) == (expected.collapsed, expected.chance)
    assert json.loads((result.run_dir / "metrics.json").read_text())["health"] == expected.message != ""
    assert (result.run_dir / "reliability.png").stat().st_size > 0
