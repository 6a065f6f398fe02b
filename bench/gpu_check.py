"""`make gpu-check` (`python -m bench.gpu_check`): what any machine with a GPU runs first, in under 5 minutes.

Each step runs what a user runs and prints its figure; the table is saved as JSON under outputs/bench/:

1. extraction throughput against the bare model forward, ViT-B (deit) and ResNet152, with AMP (`bench.extraction`);
2. a 1-GPU `torchrun -m extract run` on the synthetic demo set: its images/s, and the cache every later step reads;
3. `probe sweep --head deit --deit-per-pass auto` on that cache's tokens: DeiT heads side by side, as many per pass
   as the GPU's memory holds, seconds per head;
4. `finetune run --amp-dtype fp16` stopped (SIGTERM) after its first checkpoint, then `--resume`d: fp16 with a GradScaler,
   as the study trained (bf16 GPUs included); the checkpoint must hold the
   scaler's state and the resumed run must train each remaining epoch once.

The backbones' official weights are used where present, else random ones (said in the table: throughput does not
depend on them). Without CUDA the check refuses in one line, unless `--smoke`: the same steps on the CPU with tiny
models (a few seconds each), which is what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.common import REPO, machine, run_main, summary_path
from bench.extraction import compare
from cache.store import CacheReader
from common.errors import MedfmError
from ledger.runs import read_history
from ledger.store import Ledger

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Scale:
    """The sizes of one mode: real models on the GPU, or tiny ones on the CPU (`--smoke`)."""

    device: str
    image_size: int
    per_class: int  # demo images per class (4 classes)
    rounds: int
    vit: dict[str, Any]  # constructor overrides of deit (none: ViT-B) and resnet152
    cnn: dict[str, Any]
    deit_head: list[str]  # probe sweep's DeiT-head options
    finetune: list[str]  # finetune run's model and batch options
    finetune_epochs: int  # stopped after the first checkpoint, resumed to the end; the tiny run's epochs take milliseconds,
    # so it has enough of them that the stop always lands before the last

    def override_args(self, overrides: dict[str, Any]) -> list[str]:
        return [a for k, v in overrides.items() for a in ("--override", f"{k}={v}")]


GPU = Scale("cuda", 224, 128, 2, {}, {}, ["--head-preset", "deit-b", "--head-depth", "12"],
            ["--batch-size", "64", "--head", "linear"], 3)
SMOKE = Scale("cpu", 64, 8, 1, {"embed_dim": 32, "depth": 2, "num_heads": 2}, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)},
              ["--head-preset", "deit-t", "--head-depth", "1", "--head-weights", "random"], ["--batch-size", "8", "--head", "linear", "--workers", "0"], 12)
DEIT_HEADS = 4


@dataclass
class Figure:
    step: str
    name: str
    value: float
    unit: str
    note: str = ""


def main(argv: list[str] | None = None) -> list[Figure]:
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise MedfmError("no CUDA device here: `make gpu-check` is for a machine with a GPU "
                         "(`python -m bench.gpu_check --smoke` runs the same steps on the CPU with tiny models)")
    scale = SMOKE if args.smoke else GPU
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="medfm-gpu-check-"))
    env = {**os.environ, "MEDFM_OUTPUT": str(work), "HF_HUB_OFFLINE": "1"}
    figures: list[Figure] = []
    started = time.perf_counter()
    try:
        steps: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("extraction vs bare forward", lambda: extraction_ratios(scale, work)),
            ("torchrun extraction", lambda: torchrun_extraction(scale, env, work)),
            ("probe sweep, DeiT heads side by side", lambda: deit_sweep(scale, env, work)),
            ("finetune fp16, killed and resumed", lambda: finetune_resume(scale, env, work)),
        ]
        for title, step in steps:
            console.rule(title)
            found = step()
            for f in found:
                console.print(f"{f.step}: {f.name} = {f.value:.4g} {f.unit}" + (f" ({f.note})" if f.note else ""), highlight=False)
            figures += found
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(figures, scale, args.smoke, time.perf_counter() - started, console)
    return figures


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="run the steps on the CPU with tiny models (no GPU needed)")
    return parser.parse_args(argv)


def extraction_ratios(scale: Scale, work: Path) -> list[Figure]:
    """The pipeline's images/s over the bare forward's, with the runner's AMP (bf16 on CUDA)."""
    figures = []
    for name, backbone, overrides in (("ViT-B", "deit", scale.vit), ("ResNet152", "resnet152", scale.cnn)):
        found = compare(name, backbone, overrides, torch.device(scale.device), work, scale.image_size, scale.per_class, scale.rounds,
                        workers=None)
        step = f"extract {name}"
        target = "tiny models: start-up dominates" if scale.device == "cpu" else "target >= 0.8"
        figures += [Figure(step, "pipeline / bare forward", found["ratio"], "",
                           f"{target}, batch {found['batch_size']}, RANDOM weights (the speed is the same)"),
                    Figure(step, "pipeline", found["pipeline_img_s"], "img/s"), Figure(step, "bare forward", found["bare_img_s"], "img/s")]
    return figures


def torchrun_extraction(scale: Scale, env: dict[str, str], work: Path) -> list[Figure]:
    """`torchrun --nproc_per_node 1 -m extract run`: one shard, joined into the cache the next steps read."""
    line = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "extract", "run", *dataset_args(scale),
            "--backbone", "deit", "--weights", "auto", "--out", str(work / "features"), *scale.override_args(scale.vit)]
    seconds, _ = run(line, env)
    with CacheReader(the_cache(work)) as reader:
        images = sum(len(reader.ids(split)) for split in ("train", "val", "test"))
        random = reader.meta.backbone.random_weights
        extract_seconds = reader.meta.extract_seconds
    return [Figure("torchrun extract", "images/s", images / extract_seconds, "img/s", f"{images} images, {weights_note(random)}"),
            Figure("torchrun extract", "command", seconds, "s", "process start and model build included")]


def deit_sweep(scale: Scale, env: dict[str, str], work: Path) -> list[Figure]:
    """DeiT heads side by side over one read of the tokens, as many per pass as the GPU holds (`--deit-per-pass auto`)."""
    lrs = ",".join(f"{1e-4 * (k + 1):g}" for k in range(DEIT_HEADS))
    line = [str(BIN / "probe"), "sweep", "--cache", str(the_cache(work)), "--head", "deit", "--lr", lrs, "--epochs", "1",
            "--deit-per-pass", "auto", "--device", scale.device, *scale.deit_head]
    seconds, said = run(line, env)
    sized = re.search(r"--deit-per-pass auto: (\d+) DeiT head", said)
    per_pass = sized.group(1) if sized else "?"
    return [Figure("probe sweep deit", "per head", seconds / DEIT_HEADS, "s",
                   f"{DEIT_HEADS} heads, {per_pass} per pass (auto), 1 epoch, process start included")]


def finetune_resume(scale: Scale, env: dict[str, str], work: Path) -> list[Figure]:
    """SIGTERM once the first epoch's checkpoint is written, then `--resume` finishes the run."""
    out = work / "runs"
    line = [str(BIN / "finetune"), "run", "--amp-dtype", "fp16", *dataset_args(scale), "--backbone", "deit", "--weights", "auto",
            "--epochs", str(scale.finetune_epochs), "--warmup-steps", "2", "--out", str(out), *scale.finetune, *scale.override_args(scale.vit)]
    started = time.perf_counter()
    killed = subprocess.Popen(line, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = wait_for(out, "finetune/*/checkpoint.pt", killed)
    err = stop(killed)
    if killed.returncode not in (130, 143) or not checkpoint.exists():
        raise MedfmError(f"finetune was not stopped after its first epoch (exit {killed.returncode}): {err.strip()[-300:]}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    scaled = bool(state["scaler"])  # a disabled GradScaler saves an empty state
    if scale.device == "cuda" and not scaled:
        raise MedfmError("the fp16 finetune ran without a GradScaler: its checkpoint holds no scaler state")
    first = time.perf_counter() - started
    seconds, _ = run([*line, "--resume"], env)
    run_dir = checkpoint.parent
    history = read_history(run_dir)
    if [h["epoch"] for h in history] != list(range(1, scale.finetune_epochs + 1)):
        raise MedfmError(f"the resumed finetune did not train every epoch once: {[h['epoch'] for h in history]}")
    train_images = len(json.loads((run_dir / "splits.json").read_text())["train"])
    (row,) = Ledger(out / "results.sqlite").rows(stage="finetune")
    epoch_seconds = history[-1]["seconds"]
    precision = "fp16 + GradScaler" if scaled else "fp32 (the CPU: fp16 + GradScaler needs CUDA)"
    return [Figure("finetune", "last epoch (resumed)", train_images / epoch_seconds, "img/s", precision),
            Figure("finetune", "killed after a checkpoint", first, "s", f"checkpoint at epoch {state['epoch']}"),
            Figure("finetune", "--resume to the end", seconds, "s", f"val {row.val_score:.4f}, {weights_note(row.backbone_random)}")]


def dataset_args(scale: Scale) -> list[str]:
    return ["--dataset", "demo", "--opt", f"per_class={scale.per_class}", "--image-size", str(scale.image_size), "--device", scale.device]


def weights_note(random: bool) -> str:
    return "RANDOM weights (no official file here)" if random else "official weights"


def the_cache(work: Path) -> Path:
    (path,) = (work / "features").glob("deit/*.h5")
    return path


def run(line: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds the command took, and what it printed; its last lines in the error when it fails."""
    started = time.perf_counter()
    done = subprocess.run(line, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MedfmError(f"`{' '.join(line[:3])} ...` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return time.perf_counter() - started, done.stdout + done.stderr


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, as a scheduler ends a job, at once (tiny smoke epochs end in milliseconds); its stderr."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1]


def wait_for(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 600.0) -> Path:
    """The first file matching `pattern` under `folder`, polled while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if process.poll() is not None:
            raise MedfmError(f"the command ended (exit {process.returncode}) before writing {pattern}: {process.stderr.read()[-300:]}")
        time.sleep(0.02)
    process.kill()
    raise MedfmError(f"no {pattern} after {timeout:.0f} s")


def report(figures: list[Figure], scale: Scale, smoke: bool, seconds: float, console: Console) -> Path:
    """The table of figures, and the JSON beside the benchmarks' summary."""
    table = Table("step", "figure", "value", "", title=f"gpu check ({'CPU smoke, tiny models' if smoke else scale.device})")
    for f in figures:
        table.add_row(f.step, f.name, f"{f.value:.4g} {f.unit}", f.note)
    console.print(table)
    path = summary_path().parent / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"smoke": smoke, "seconds": round(seconds, 1), "machine": machine(),
                                "figures": [f.__dict__ for f in figures]}, indent=1))
    console.print(f"{seconds:.0f} s in all; figures in {path}")
    return path


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
