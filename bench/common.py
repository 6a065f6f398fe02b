"""What every benchmark shares: side-by-side timing, the machine it ran on, and the JSON summary.

Other processes, and on a cloud machine other virtual machines, share the CPU, so a lone wall time says little. Every
benchmark times its contenders in alternation, round after round, and keeps each one's fastest round: the fastest
round is the one least disturbed by the neighbours, and the ratio of two fastest rounds is what the summary records.
Where each contender takes seconds (a whole extraction against the bare forward), the fastest rounds may come from
minutes of different load, so the baseline is timed right before and after each contender's every run and the ratio
is the median of the rounds' (`bracketed_ratios`).

Every benchmark also has a smoke mode (`python -m bench.<name> --smoke`, or `python -m bench --smoke`): the same
functions called the same way, with tiny models, a few rows and one round, in seconds. It proves the code path still
runs (the test suite runs it for every benchmark); its ratios mean nothing, so it checks no target and appends
nothing to the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.runtime import cpu_cores

if TYPE_CHECKING:
    from probe.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SUMMARY_ENV = "MEDFM_BENCH_SUMMARY"
RUN_ENV = "MEDFM_BENCH_RUN"  # set by `python -m bench`: which invocation a record belongs to
# the smoke mode's models, as small as the tests' (tests/tiny.py): constructor overrides of deit and resnet152
SMOKE_VIT: dict[str, Any] = {"embed_dim": 32, "depth": 1, "num_heads": 2}
SMOKE_RESNET: dict[str, Any] = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}
SMOKE_IMAGE_SIZE = 32



@dataclass(frozen=True)
class DemoSizes:
    """A benchmark on the demo dataset through a tiny-to-small DeiT: its shape, inputs, head and rounds."""

    overrides: dict[str, Any]
    image_size: int
    per_class: int  # demo images of each of the 4 classes
    config: TrainConfig
    rounds: int

def summary_path() -> Path:
    """outputs/bench/summary.json, or $MEDFM_BENCH_SUMMARY."""
    if os.environ.get(SUMMARY_ENV):
        return Path(os.environ[SUMMARY_ENV])
    return Path(os.environ.get("MEDFM_OUTPUT", "outputs")) / "bench" / "summary.json"


def machine() -> dict[str, Any]:
    """Where the figures came from, including how busy the machine was when the benchmark started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": cpu_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    return info


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def scratch_outputs(work: Path) -> Iterator[None]:
    """Run folders, ledgers and caches of a benchmark go to `work`, not the user's outputs/."""
    before = os.environ.get("MEDFM_OUTPUT")
    os.environ["MEDFM_OUTPUT"] = str(work)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MEDFM_OUTPUT")
        else:
            os.environ["MEDFM_OUTPUT"] = before


def device() -> torch.device:
    """CUDA when present (the lead runs `make bench` there once), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass(frozen=True)
class LeftOut:
    """What a contender returns to have `seconds` of its round left out of its time: work its rival does not time
    either (the extraction pipeline's model build, which the bare forward's model was spared)."""

    seconds: float


def round_seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`, less what it returned as `LeftOut`."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start - (result.seconds if isinstance(result, LeftOut) else 0.0)


def fastest_rounds(contenders: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Seconds of each contender's fastest round, less what it returned as `LeftOut`; contenders alternate inside
    every round."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = min(best[name], round_seconds(fn))
    return best


@dataclass(frozen=True)
class Bracketed:
    """`bracketed_ratios`' result: each contender's ratio in every round, and each one's fastest seconds."""

    rounds: dict[str, list[float]]  # baseline seconds / contender seconds, round by round
    fastest: dict[str, float]  # the baseline's under "baseline"

    def ratio(self, name: str) -> float:
        """The median of `name`'s rounds: the figure held to a target."""
        return statistics.median(self.rounds[name])


def bracketed_ratios(baseline: Callable[[], Any], contenders: dict[str, Callable[[], Any]], rounds: int) -> Bracketed:
    """Each contender's speed as a share of the baseline's, round by round: baseline seconds / contender seconds, where
    the baseline runs right before and right after every contender's run and its two times are averaged (and the
    fastest seconds of each).

    For contenders that each take seconds (a whole extraction), the fastest rounds of two of them may come from
    different minutes: a 2-core cloud machine's speed drifts by a quarter over tens of seconds, smoothly (a batch's time
    correlated 0.87 with the next's). Bracketed on both sides by the baseline, a run's ratio is taken under the load of
    its own seconds: the baseline, then each contender with a baseline after it. With one baseline run a round, shared by
    two contenders' brackets, ratios of like work scattered half as much again (standard deviation 0.054 against 0.036).
    The median (`Bracketed.ratio`) leaves out a round that a passing neighbour disturbed."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: dict[str, list[float]] = {name: [] for name in contenders}
    base = [round_seconds(baseline)]
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(round_seconds(fn))
            base.append(round_seconds(baseline))
            ratios[name].append((base[-2] + base[-1]) / 2 / times[name][-1])
    return Bracketed(ratios, {"baseline": min(base), **{name: min(ts) for name, ts in times.items()}})


def at_least(value: float) -> tuple[str, float]:
    return (">=", value)


def at_most(value: float) -> tuple[str, float]:
    return ("<=", value)


def met(value: float, target: tuple[str, float]) -> bool:
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def record(bench: str, ratios: dict[str, float], targets: dict[str, tuple[str, float]], details: dict[str, Any],
           smoke: bool = False) -> dict[str, Any]:
    """Print the ratios and append them, with their targets (`at_least`, `at_most`) and the machine, to the JSON summary.

    `smoke`: tiny sizes, so the ratios are printed without their targets and nothing is appended; the entry is still
    built and serialised, as the summary would hold it.
    """
    entry = {
        "bench": bench,
        "run": os.environ.get(RUN_ENV),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "code_version": code_version(),
        "machine": machine(),
        "ratios": {k: round(float(v), 3) for k, v in ratios.items()},
        "targets": targets,
        "details": details,
    }
    json.dumps(entry)  # raises on what the summary could not hold, in either mode
    if smoke:
        for name, value in entry["ratios"].items():
            print(f"{bench}: {name} = {value:.3f}  (smoke: tiny sizes, no target)", flush=True)
        return entry
    for name, value in entry["ratios"].items():
        target = targets.get(name)
        verdict = "" if target is None else f"  (target {target[0]} {target[1]:g}: {'met' if met(value, target) else 'MISSED'})"
        print(f"{bench}: {name} = {value:.3f}{verdict}", flush=True)
    path = summary_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(entry)
    path.write_text(json.dumps(entries, indent=1))
    return entry


def run_main(main: Callable[[], Any]) -> None:
    """Entry point of `python -m bench.<name>`: offline, and a user error is one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common.errors import MedfmError

    try:
        main()
    except MedfmError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_bench(main: Callable[[bool], Any], argv: list[str] | None = None) -> None:
    """Entry point of a benchmark module: `python -m bench.<name> [--smoke]` calls `main(smoke)` through `run_main`."""
    parser = argparse.ArgumentParser(description="a medfm benchmark; figures are appended to outputs/bench/summary.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: run the code path in seconds, record nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_main(lambda: main(args.smoke))
