"""`make gpu-check` (`python -m bench.gpu_check`): what any machine with a GPU runs first, in under 5 minutes.

Each step runs what a user runs and prints its figure; the table is saved as JSON under outputs/bench/:

1. extraction throughput against the bare model forward, ViT-B (deit) and ResNet152, with AMP (`bench.extraction`);
2. precision x compile, as timm's benchmark measures it: the bare forward of ViT-B, ResNet152 and SAM's ViT-B image
   encoder in fp32, under the AMP policy (bf16 where the GPU has it, else fp16) and under AMP + torch.compile (inductor),
   in images/s, beside approximate published H100 figures; and `extract run --compile` against the compiled bare
   forward. A fixed batch (`compile_batch`, 128 on the GPU; the published figures are at 256) on a random input, the
   forwards alternating round by round (`bench.extraction.forward_rates`); the pipeline on a demo set whose splits are
   whole batches, so no batch of another size recompiles it. Each backbone compiles once: the pipeline's model reuses the
   bare forward's compiled code. SAM runs at medfm's 224 px, not its native 1024 (what medfm extracts, and a 1024-px
   encoder's compilation and fp32 forward would not fit the budget), so the 2.6x compile speed-up published for it at
   1024 px is a loose reference only. `--no-compile` leaves out the compiled cells and the pipeline;
3. a 1-GPU `torchrun -m extract run` on the synthetic demo set: its images/s, and the cache every later step reads;
4. `probe sweep --head deit --deit-per-pass auto` on that cache's tokens: DeiT heads side by side, as many per pass
   as the GPU's memory holds, seconds per head;
5. `finetune run --amp-dtype fp16` stopped (SIGTERM) after its first checkpoint, then `--resume`d: fp16 with a GradScaler,
   as the study trained (bf16 GPUs included); the checkpoint must hold the
   scaler's state and the resumed run must train each remaining epoch once;
6. augmented views cut on the device (`extract run --pixels-on-device`, docs/images.md §5) against the loader's workers:
   `extract run --views 8 --augment study` both ways from one image cache, in images/s (every view of every train image
   and the eval splits), and the largest difference in levels between the device's views and Pillow's for the first
   batch of each view (0 is bit for bit: then a device-made cache could share the loader's fingerprint).

The JSON holds `figures` (every figure printed), `steps` (each step's seconds: the whole check should take under 5
minutes, and says so when it does not) and `precision_compile`, one entry per backbone, precision and compile backend:
`backbone`, `precision` (fp32 | bf16 | fp16), `compile_backend` (null: not compiled), `batch_size`, `bare_img_s`,
`pipeline_over_bare` (`extract run --compile`'s images/s over the compiled bare forward's, as step 1 measures it;
compiled cells only) and `published_h100_img_s` (null where none is published).

The backbones' official weights are used where present, else random ones (said in the table: throughput does not
depend on them). Without CUDA the check refuses in one line, unless `--smoke`: the same steps on the CPU with tiny
models (a few seconds each), which is what the test suite runs; there torch.compile uses the `eager` backend (dynamo
traces the forward and runs it unchanged: no code generation, seconds rather than minutes) and the AMP cells bf16.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.common import REPO, machine, run_main, summary_path
from bench.extraction import compare, forward_rates
from cache.store import CacheReader
from common.errors import MedfmError
from common.precision import autocast_dtype
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.device_views import DeviceViews
from extract.image_cache import find_image_cache
from extract.runner import BackboneForward, group_images
from extract.transforms import TransformSpec, make_spec
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
    sam: dict[str, Any]  # constructor overrides of sam (none: SAM's ViT-B image encoder)
    compile_backend: str  # torch.compile's backend in the precision x compile step
    compile_batch: int  # that step's batch, a power of two (capped by the runner's auto batch size)
    compile_per_class: int  # its demo images per class: 60/20/20 splits of whole batches, so no other batch size recompiles
    warmup: int  # untimed batches before a bare forward is timed, then `steps` timed batches per round
    steps: int

    def override_args(self, overrides: dict[str, Any]) -> list[str]:
        return [a for k, v in overrides.items() for a in ("--override", f"{k}={v}")]

    def backbones(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The precision x compile step's backbones: (name in the table, medfm's backbone, constructor overrides)."""
        return [("ViT-B", "deit", self.vit), ("ResNet152", "resnet152", self.cnn), ("SAM ViT-B", "sam", self.sam)]


GPU = Scale("cuda", 224, 128, 2, {}, {}, ["--head-preset", "deit-b", "--head-depth", "12"],
            ["--batch-size", "64", "--head", "linear"], 3,
            sam={}, compile_backend="inductor", compile_batch=128, compile_per_class=160, warmup=5, steps=20)
SMOKE = Scale("cpu", 64, 8, 1, {"embed_dim": 32, "depth": 2, "num_heads": 2}, {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)},
              ["--head-preset", "deit-t", "--head-depth", "1", "--head-weights", "random"], ["--batch-size", "8", "--head", "linear", "--workers", "0"], 12,
              sam={"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 2},
              compile_backend="eager", compile_batch=4, compile_per_class=5, warmup=1, steps=2)
DEIT_HEADS = 4
VIEWS = 8  # augmented views of the device-views step
BUDGET_S = 300  # `make gpu-check` should take under 5 minutes
# approximate third-party figures published for an H100 (timm-style: 224 px, batch 256), not measured by medfm:
# (backbone, compiled) -> images/s of the bare forward under AMP
PUBLISHED_H100 = {("ViT-B", False): 6000.0, ("ViT-B", True): 7700.0, ("ResNet152", False): 4000.0, ("ResNet152", True): 8800.0}


@dataclass
class Figure:
    step: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Cell:
    """One backbone's bare forward at one precision, compiled or not: a row of the precision x compile table."""

    backbone: str
    precision: str  # fp32 | bf16 | fp16
    compile_backend: str | None  # None: not compiled
    batch_size: int
    bare_img_s: float
    pipeline_over_bare: float | None = None  # `extract run --compile` over this compiled forward; compiled cells only
    published_h100_img_s: float | None = None

    @property
    def label(self) -> str:
        return self.precision + (" + compile" if self.compile_backend else "")


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
    cells: list[Cell] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def precision_step() -> list[Figure]:
        cells.extend(precision_compile(scale, work, compiled=not args.no_compile))
        return cell_figures(cells)

    try:
        steps: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("extraction vs bare forward", lambda: extraction_ratios(scale, work)),
            ("precision x compile", precision_step),
            ("torchrun extraction", lambda: torchrun_extraction(scale, env, work)),
            ("probe sweep, DeiT heads side by side", lambda: deit_sweep(scale, env, work)),
            ("finetune fp16, killed and resumed", lambda: finetune_resume(scale, env, work)),
            ("augmented views on the device", lambda: device_views(scale, env, work)),
        ]
        for title, step in steps:
            console.rule(title)
            begun = time.perf_counter()
            found = step()
            seconds[title] = time.perf_counter() - begun
            for f in found:
                console.print(f"{f.step}: {f.name} = {f.value:.4g} {f.unit}" + (f" ({f.note})" if f.note else ""), highlight=False)
            console.print(f"{title}: {seconds[title]:.0f} s", highlight=False)
            figures += found
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(figures, cells, seconds, scale, args.smoke, time.perf_counter() - started, console)
    return figures


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="run the steps on the CPU with tiny models (no GPU needed)")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the precision x compile step "
                        "(its compilations take most of the check's time)")
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


def precision_compile(scale: Scale, work: Path, compiled: bool) -> list[Cell]:
    """Each backbone's bare forward in fp32, under AMP and (`compiled`) under AMP + torch.compile, through the runner's
    `BackboneForward`; and `extract run --compile` against the compiled forward (`bench.extraction.compare`)."""
    dev = torch.device(scale.device)
    amp = autocast_dtype("auto", dev) or torch.bfloat16  # the CPU's policy is fp32: bf16 there, so the smoke run autocasts too
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    shape = (3, scale.image_size, scale.image_size)
    cells = []
    for name, backbone, overrides in scale.backbones():
        # afresh for each, as in its own `extract run --compile`: every backbone's forward is the same code
        # (`Backbone.forward_layers`), whose compiled versions count towards one recompile limit
        torch.compiler.reset()
        model = create_backbone(backbone, "random", image_size=scale.image_size, **overrides)
        layers = [model.num_layers - 1]
        policy = BackboneForward(model, layers, dev, amp)
        batch = min(policy.auto_batch_size(shape), scale.compile_batch)
        forwards = {"fp32": BackboneForward(model, layers, dev, None), precision: policy}
        if compiled:
            forwards["compiled"] = BackboneForward(model, layers, dev, amp)
            forwards["compiled"].compile(scale.compile_backend)
        images = torch.randn(batch, *shape, device=dev).contiguous(memory_format=policy.memory_format)
        rates = forward_rates(forwards, images, scale.warmup, scale.steps, scale.rounds)
        cells += [Cell(name, "fp32", None, batch, rates["fp32"]),
                  Cell(name, precision, None, batch, rates[precision], published_h100_img_s=PUBLISHED_H100.get((name, False)))]
        if compiled:
            found = compare(name, backbone, overrides, dev, work, scale.image_size, scale.compile_per_class, scale.rounds,
                            workers=None, compile=True, batch_size=batch, precision=precision,
                            compile_backend=scale.compile_backend)
            cells.append(Cell(name, precision, scale.compile_backend, batch, rates["compiled"], found["ratio"],
                              PUBLISHED_H100.get((name, True))))
    return cells


def cell_figures(cells: list[Cell]) -> list[Figure]:
    """The precision x compile cells as printed figures: each bare forward, and the pipeline's share of the compiled one."""
    uncompiled = {(c.backbone, c.precision): c.bare_img_s for c in cells if c.compile_backend is None}
    figures = []
    for c in cells:
        step = f"forward {c.backbone}"
        notes = [f"batch {c.batch_size}"]
        if c.compile_backend:
            notes.append(f"{c.compile_backend}, {c.bare_img_s / uncompiled[c.backbone, c.precision]:.2f}x uncompiled")
        if c.published_h100_img_s:
            notes.append(f"published H100 ~{c.published_h100_img_s:,.0f} img/s")
        figures.append(Figure(step, f"bare {c.label}", c.bare_img_s, "img/s", ", ".join(notes)))
        if c.pipeline_over_bare is not None:
            figures.append(Figure(step, f"pipeline / bare, {c.label}", c.pipeline_over_bare, "", "extract run --compile"))
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


def device_views(scale: Scale, env: dict[str, str], work: Path) -> list[Figure]:
    """The study's augmented views cut by the loader's workers (Pillow) and on the device from the image cache held there,
    at one batch size: the images/s of each extraction, and how far the device's views are from Pillow's, in levels."""
    tspec = make_spec(scale.image_size, (0.5,) * 3, (0.25,) * 3, "bilinear")  # the resize and interpolation of both runs
    demo = ["--dataset", "demo", "--opt", f"per_class={scale.per_class}"]
    run([str(BIN / "extract"), "images", *demo, "--resize", str(tspec.resize)], env)
    rates = {}
    for name, extra in (("loader", []), ("device", ["--pixels-on-device"])):
        out = work / f"views-{name}"
        run([str(BIN / "extract"), "run", *dataset_args(scale), "--backbone", "deit", "--weights", "random", "--interpolation", "bilinear",
             "--views", str(VIEWS), "--augment", "study", "--batch-size", str(scale.compile_batch), "--out", str(out),
             *scale.override_args(scale.vit), *extra], env)
        (path,) = out.glob("deit/*.h5")
        with CacheReader(path) as reader:
            rates[name] = sum(len(reader.dataset(g, "pooled")) for g in reader.groups) / reader.meta.extract_seconds
    levels = view_levels(scale, tspec, work / "images")
    return [Figure("device views", "loader workers", rates["loader"], "img/s", f"{VIEWS} augmented views and the eval splits"),
            Figure("device views", "--pixels-on-device", rates["device"], "img/s"),
            Figure("device views", "device / loader", rates["device"] / rates["loader"], ""),
            Figure("device views", "largest difference from Pillow's views", levels, "levels", "0: bit for bit")]


def view_levels(scale: Scale, tspec: TransformSpec, images: Path) -> float:
    """The largest difference, in levels, between the device's augmented views and the PIL pipeline's (`group_images`) over
    the first batch of the train split in every view."""
    source = get_dataset("demo", per_class=scale.per_class)
    pixels = find_image_cache(source, None, tspec, str(images))
    if pixels is None:
        raise MedfmError(f"the device-views step found no image cache in {images}")
    held = DeviceViews(pixels, source, tspec, torch.device(scale.device), seed=0)
    rows = min(scale.compile_batch, len(source.splits["train"]))
    worst = 0
    for view in range(VIEWS):
        cut, _, _ = held.batch("train", view, 0, rows)
        reference = group_images(source, "train", tspec, view, 0, pixels=pixels)
        expected = torch.stack([reference[i][0] for i in range(rows)])
        worst = max(worst, int((cut.cpu().int() - expected.int()).abs().max()))
    return float(worst)


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


def report(figures: list[Figure], cells: list[Cell], steps: dict[str, float], scale: Scale, smoke: bool, seconds: float,
           console: Console) -> Path:
    """The table of figures, the precision x compile table, and the JSON beside the benchmarks' summary."""
    table = Table("step", "figure", "value", "", title=f"gpu check ({'CPU smoke, tiny models' if smoke else scale.device})")
    for f in figures:
        table.add_row(f.step, f.name, f"{f.value:.4g} {f.unit}", f.note)
    console.print(table)
    grid = Table("backbone", "precision", "compile", "bare forward", "published H100", "pipeline / bare",
                 title="precision x compile (published: approximate third-party figures, batch 256)")
    for c in cells:
        grid.add_row(c.backbone, c.precision, c.compile_backend or "-", f"{c.bare_img_s:,.0f} img/s",
                     f"~{c.published_h100_img_s:,.0f} img/s" if c.published_h100_img_s else "",
                     f"{c.pipeline_over_bare:.2f}" if c.pipeline_over_bare is not None else "")
    console.print(grid)
    path = summary_path().parent / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"smoke": smoke, "seconds": round(seconds, 1), "machine": machine(),
                                "steps": {title: round(s, 1) for title, s in steps.items()},
                                "figures": [f.__dict__ for f in figures], "precision_compile": [asdict(c) for c in cells]},
                               indent=1))
    console.print(f"{seconds:.0f} s in all; figures in {path}")
    if not smoke and seconds > BUDGET_S:
        console.print(f"warning: over the {BUDGET_S // 60}-minute budget of `make gpu-check` (each step's time is above; "
                      "--no-compile leaves out the compilations)", style="yellow")
    return path


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
