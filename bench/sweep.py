"""Benchmark 3: a sweep of K = 12 linear heads in one batched pass vs 12 separate runs, measured two ways.

- Commands (the target): one `probe sweep` process over 4 learning rates x 3 weight decays vs twelve `probe run`
  processes, one per configuration, as a user types them; each process pays its start (Python, torch, the cache's
  opening) once, so the sweep pays it once and the separate runs twelve times.
- In-process: `probe.sweep.run_sweep` vs `probe.run.run_probe` called twelve times in this process, no start at all:
  what batching saves inside training and saving alone.
Both are the user-level paths: run folders and ledger rows included.

The cache has APTOS 2019's shape under the study's split (2564 / 549 / 549 rows, 5 grades) with
768-d pooled features, written by the real `CacheWriter`: class-dependent Gaussian features, since
what is measured is the probe's training, not what the features mean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.common import at_least, device, fastest_rounds, record, run_main, scratch_outputs
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.run import run_probe
from probe.sweep import run_sweep

ROWS = {"train": 2564, "val": 549, "test": 549}
DIM, CLASSES = 768, 5
BASE = TrainConfig(head="linear", feature="pooled", epochs=10, batch_size=64, warmup_steps=10)
CONFIGS = [replace(BASE, lr=lr, weight_decay=wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3) for wd in (1e-5, 1e-4, 1e-3)]
ROUNDS = 2  # for each comparison: a neighbour's burst spoils one round, rarely both
TARGET_COMMANDS, TARGET_IN_PROCESS = 10.0, 3.0


def write_cache(path: Path) -> Path:
    """An APTOS-shaped cache of pooled features, split by split, batch by batch, as extraction writes it."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM)).astype(np.float32)
    labels = {split: np.arange(n) % CLASSES for split, n in ROWS.items()}
    plan = {split: SplitPlan([f"{split}-{i}" for i in range(n)], labels[split], {"pooled": FeatureSpec((DIM,), "float32")})
            for split, n in ROWS.items()}
    meta = CacheMeta(BackboneInfo("synthetic"), DatasetInfo("aptos-shaped"),
                     Task("multiclass", tuple(f"grade{i}" for i in range(CLASSES)), "quadratic_kappa"), layers=(0,), num_layers=1)
    writer = CacheWriter.open(path, meta, plan)
    for split, n in ROWS.items():
        for start in range(0, n, 256):
            y = labels[split][start : start + 256]
            writer.write(split, start, {"pooled": centres[y] + 20 * rng.standard_normal((len(y), DIM), dtype=np.float32)})
    return writer.finalize()


def commands(cache: Path, dev: str) -> dict[str, list[list[str]]]:
    """The shell commands of each contender: one `probe sweep`, or one `probe run` per configuration."""
    probe = str(Path(sys.executable).parent / "probe")
    shared = ["--cache", str(cache), "--epochs", str(BASE.epochs), "--batch-size", str(BASE.batch_size),
              "--warmup-steps", str(BASE.warmup_steps), "--device", dev, "--force"]
    lrs = ",".join(dict.fromkeys(f"{c.lr:g}" for c in CONFIGS))
    wds = ",".join(dict.fromkeys(f"{c.weight_decay:g}" for c in CONFIGS))
    return {"batched": [[probe, "sweep", *shared, "--lr", lrs, "--weight-decay", wds]],
            "separate": [[probe, "run", *shared, "--lr", f"{c.lr:g}", "--weight-decay", f"{c.weight_decay:g}"] for c in CONFIGS]}


def run_commands(lines: list[list[str]], output: Path) -> None:
    env = {**os.environ, "MEDFM_OUTPUT": str(output), "HF_HUB_OFFLINE": "1"}
    for line in lines:
        subprocess.run(line, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> dict:
    dev = str(device())
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-sweep-"))
    scores: dict[str, list[float]] = {}
    try:
        with scratch_outputs(work), CacheReader(write_cache(work / "sweep.h5")) as reader:

            def batched() -> None:
                outcome = run_sweep(reader, CONFIGS, device=dev, force=True, ledger=Ledger(work / "batched.sqlite"), console=quiet)
                scores["batched"] = [r.val_score for r in outcome.records]

            def separate() -> None:
                ledger = Ledger(work / "separate.sqlite")
                scores["separate"] = [run_probe(reader, c, device=dev, force=True, ledger=ledger, console=quiet).record.val_score for c in CONFIGS]

            best = fastest_rounds({"batched": batched, "separate": separate}, ROUNDS)
        lines = commands(work / "sweep.h5", dev)
        shell = fastest_rounds({name: lambda name=name: run_commands(lines[name], work / "cli" / name) for name in lines}, ROUNDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gap = float(np.max(np.abs(np.array(scores["batched"]) - np.array(scores["separate"]))))
    ratios = {"commands_separate_over_batched": shell["separate"] / shell["batched"],
              "in_process_separate_over_batched": best["separate"] / best["batched"]}
    print(f"sweep: 12 `probe run` processes {shell['separate']:.1f} s, one `probe sweep` process {shell['batched']:.1f} s; "
          f"in this process (no process start): 12 run_probe calls {best['separate']:.2f} s, one run_sweep {best['batched']:.2f} s")
    details = {"heads": len(CONFIGS), "rows": ROWS, "dim": DIM, "epochs": BASE.epochs, "batch_size": BASE.batch_size, "rounds": ROUNDS,
               "seconds": {k: round(v, 2) for k, v in best.items()}, "command_seconds": {k: round(v, 2) for k, v in shell.items()},
               "max_val_score_gap": round(gap, 6), "best_val_kappa": round(max(scores["batched"]), 3)}
    targets = {"commands_separate_over_batched": at_least(TARGET_COMMANDS), "in_process_separate_over_batched": at_least(TARGET_IN_PROCESS)}
    return record("sweep", ratios, targets, details)


if __name__ == "__main__":
    run_main(main)
