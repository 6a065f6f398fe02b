"""`python -m bench [--smoke] [name ...]`: run the benchmarks one after another, each in its own process (a measurement
starts from a clean interpreter: no other benchmark's imports, threads or memory), then print every ratio of this run
with its target. Figures accumulate in outputs/bench/summary.json.

`--smoke`: each benchmark's smoke mode (tiny sizes, one round, seconds each), all in this one process: it proves every
code path still runs, so it pays the imports once instead of once per benchmark (they are most of a smoke run's time;
`memory` and `sweep` still start the processes they measure). It records nothing, checks no target, and exits 1 when
one of them fails, naming it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import traceback

from rich.console import Console
from rich.table import Table

from bench.common import REPO, RUN_ENV, met, summary_path

BENCHES = ("extraction", "reads", "memory", "cache_vs_online", "sweep", "deit_head", "bootstrap", "images", "tokens")


def main(args: list[str]) -> int:
    smoke = "--smoke" in args
    names = [a for a in args if a != "--smoke"]
    console = Console()
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        console.print(f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
        return 2
    path = summary_path()
    run = time.strftime("%Y%m%d-%H%M%S")
    env = {**os.environ, RUN_ENV: run}
    failed = []
    started = time.perf_counter()
    for name in names or BENCHES:
        console.rule(name)
        start = time.perf_counter()
        if not (smoke_in_process(name) if smoke else in_own_process(name, env)):
            failed.append(name)
        console.print(f"[dim]{name}: {time.perf_counter() - start:.0f} s[/]")
    if smoke:
        ran = len(names or BENCHES)
        console.print(f"smoke: {ran - len(failed)} of {ran} benchmarks ran in {time.perf_counter() - started:.0f} s (tiny sizes: "
                      "the ratios mean nothing and nothing was recorded)")
        if failed:
            console.print(f"[red]failed to run: {', '.join(failed)}[/]")
        return 1 if failed else 0
    entries = [e for e in json.loads(path.read_text()) if e.get("run") == run] if path.exists() else []
    table = Table("benchmark", "ratio", "value", "target", "")
    for entry in entries:
        for ratio, value in entry["ratios"].items():
            target = entry["targets"].get(ratio)
            verdict = "" if target is None else ("[green]met[/]" if met(value, target) else "[red]MISSED[/]")
            table.add_row(entry["bench"], ratio, f"{value:.2f}", "" if target is None else f"{target[0]} {target[1]:g}", verdict)
    console.print(table)
    if entries:
        console.print(f"{time.perf_counter() - started:.0f} s in all; machine: {entries[-1]['machine']}; summary: {path}")
    if failed:
        console.print(f"[red]failed to run: {', '.join(failed)}[/]")
    return 1 if failed else 0


def in_own_process(name: str, env: dict[str, str]) -> bool:
    """Benchmark `name` measured in a fresh interpreter; whether it ran to its end."""
    return subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=REPO, env=env, check=False).returncode == 0


def smoke_in_process(name: str) -> bool:
    """Benchmark `name`'s smoke mode in this process; False, its traceback printed, when it raises."""
    try:
        importlib.import_module(f"bench.{name}").main(True)
    except Exception:  # noqa: BLE001 - any failure of a benchmark's code path is what the smoke run reports
        traceback.print_exc()
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
