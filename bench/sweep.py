"""Benchmark 3: a sweep of K = 12 linear heads in one batched pass vs 12 separate runs, measured two ways.

- Commands (the target): one `probe sweep` process over 4 learning rates x 3 weight decays vs twelve `probe run`
  processes, one per configuration, as a user types them; each process pays its start (Python, torch, the cache's
  opening) once, so the sweep pays it once and the separate runs twelve times.
- In-process: `probe.sweep.run_sweep` vs `probe.run.run_probe` called twelve times in this process, no start at all:
  what batching saves inside training and saving alone. (The stacked heads train on one CPU thread,
  `probe.train.small_on_one_thread`: on two threads the sweep alone took longer than a whole `probe sweep` command.)
Both are the user-level paths: run folders and ledger rows included.

The cache has APTOS 2019's shape under the study's split (2564 / 549 / 549 rows, 5 grades) with
768-d pooled features, written by the real `CacheWriter`: class-dependent Gaussian features, since
what is measured is the probe's training, not what the features mean.
`--smoke`: 40 / 20 / 20 rows of 16-d features, 2 heads (2 learning rates), 1 epoch, one round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.common import at_least, device, fastest_rounds, record, run_bench, scratch_outputs
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task
from cache.store import CacheReader, CacheWriter, FeatureSpec, SplitPlan
from ledger.store import Ledger
from probe.config import TrainConfig
from probe.run import run_probe
from probe.sweep import run_sweep

CLASSES = 5
TARGET_COMMANDS, TARGET_IN_PROCESS = 10.0, 5.0


@dataclass(frozen=True)
class Sizes:
    rows: dict[str, int]
    dim: int
    base: TrainConfig
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    rounds: int

    @property
    def configs(self) -> list[TrainConfig]:
        """One configuration per learning rate and weight decay."""
        return [replace(self.base, lr=lr, weight_decay=wd) for lr in self.lrs for wd in self.weight_decays]


FULL = Sizes({"train": 2564, "val": 549, "test": 549}, 768,
             TrainConfig(head="linear", feature="pooled", epochs=10, batch_size=64, warmup_steps=10, solver="adamw"),  # the batched AdamW path
             (1e-4, 3e-4, 1e-3, 3e-3), (1e-5, 1e-4, 1e-3),
             2)  # for each comparison: a neighbour's burst spoils one round, rarely both
SMOKE = Sizes({"train": 40, "val": 20, "test": 20}, 16, replace(FULL.base, epochs=1, batch_size=8, warmup_steps=1), (1e-3, 3e-3), (1e-4,), 1)


def write_cache(path: Path, rows: dict[str, int], dim: int) -> Path:
    """An APTOS-shaped cache of pooled features, split by split, batch by batch, as extraction writes it."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, dim)).astype(np.float32)
    labels = {split: np.arange(n) % CLASSES for split, n in rows.items()}
    plan = {split: SplitPlan([f"{split}-{i}" for i in range(n)], labels[split], {"pooled": FeatureSpec((dim,), "float32")})
            for split, n in rows.items()}
    meta = CacheMeta(BackboneInfo("synthetic"), DatasetInfo("aptos-shaped"),
                     Task("multiclass", tuple(f"grade{i}" for i in range(CLASSES)), "quadratic_kappa"), layers=(0,), num_layers=1)
    writer = CacheWriter.open(path, meta, plan)
    for split, n in rows.items():
        for start in range(0, n, 256):
            y = labels[split][start : start + 256]
            writer.write(split, start, {"pooled": centres[y] + 20 * rng.standard_normal((len(y), dim), dtype=np.float32)})
    return writer.finalize()


def commands(cache: Path, dev: str, configs: list[TrainConfig]) -> dict[str, list[list[str]]]:
    """The shell commands of each contender: one `probe sweep`, or one `probe run` per configuration."""
    probe = str(Path(sys.executable).parent / "probe")
    base = configs[0]
    shared = ["--cache", str(cache), "--solver", "adamw", "--epochs", str(base.epochs), "--batch-size", str(base.batch_size),
              "--warmup-steps", str(base.warmup_steps), "--device", dev, "--force"]
    lrs = ",".join(dict.fromkeys(f"{c.lr:g}" for c in configs))
    wds = ",".join(dict.fromkeys(f"{c.weight_decay:g}" for c in configs))
    return {"batched": [[probe, "sweep", *shared, "--lr", lrs, "--weight-decay", wds]],
            "separate": [[probe, "run", *shared, "--lr", f"{c.lr:g}", "--weight-decay", f"{c.weight_decay:g}"] for c in configs]}


def run_commands(lines: list[list[str]], output: Path) -> None:
    env = {**os.environ, "MEDFM_OUTPUT": str(output), "HF_HUB_OFFLINE": "1"}
    for line in lines:
        done = subprocess.run(line, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`probe {line[1]}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    configs = s.configs
    dev = str(device())
    quiet = Console(quiet=True)
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-sweep-"))
    scores: dict[str, list[float]] = {}
    try:
        with scratch_outputs(work), CacheReader(write_cache(work / "sweep.h5", s.rows, s.dim)) as reader:

            def batched() -> None:
                outcome = run_sweep(reader, configs, device=dev, force=True, ledger=Ledger(work / "batched.sqlite"), console=quiet)
                scores["batched"] = [r.val_score for r in outcome.records]

            def separate() -> None:
                ledger = Ledger(work / "separate.sqlite")
                scores["separate"] = [run_probe(reader, c, device=dev, force=True, ledger=ledger, console=quiet).record.val_score for c in configs]

            best = fastest_rounds({"batched": batched, "separate": separate}, s.rounds)
        lines = commands(work / "sweep.h5", dev, configs)
        shell = fastest_rounds({name: lambda name=name: run_commands(lines[name], work / "cli" / name) for name in lines}, s.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gap = float(np.max(np.abs(np.array(scores["batched"]) - np.array(scores["separate"]))))
    ratios = {"commands_separate_over_batched": shell["separate"] / shell["batched"],
              "in_process_separate_over_batched": best["separate"] / best["batched"]}
    heads = len(configs)
    print(f"sweep: {heads} `probe run` processes {shell['separate']:.1f} s, one `probe sweep` process {shell['batched']:.1f} s; "
          f"in this process (no process start): {heads} run_probe calls {best['separate']:.2f} s, one run_sweep {best['batched']:.2f} s")
    details = {"heads": heads, "rows": s.rows, "dim": s.dim, "epochs": s.base.epochs, "batch_size": s.base.batch_size, "rounds": s.rounds,
               "seconds": {k: round(v, 2) for k, v in best.items()}, "command_seconds": {k: round(v, 2) for k, v in shell.items()},
               "max_val_score_gap": round(gap, 6), "best_val_kappa": round(max(scores["batched"]), 3)}
    targets = {"commands_separate_over_batched": at_least(TARGET_COMMANDS), "in_process_separate_over_batched": at_least(TARGET_IN_PROCESS)}
    return record("sweep", ratios, targets, details, smoke)


if __name__ == "__main__":
    run_bench(main)
