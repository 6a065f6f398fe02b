"""`cache`: list, inspect, verify and remove feature caches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cache.store import PARTIAL_SUFFIX, describe, is_cache_file, partial_path, verify
from common.cli import run_cli
from common.errors import MedfmError
from common.runtime import output_root

app = typer.Typer(help="Inspect and manage HDF5 feature caches.", no_args_is_help=True, add_completion=False)
console = Console()


def default_root() -> Path:
    return output_root() / "features"


def cache_files(root: Path) -> list[Path]:
    """Complete (`*.h5`) and partial (`*.h5.partial`) caches under `root`, and the shards of a torchrun extraction."""
    return sorted(p for p in root.rglob("*.h5*") if is_cache_file(p))


def _existing(path: Path) -> Path:
    if not path.exists():
        raise MedfmError(f"cache file {path} does not exist; list caches with `cache ls`")
    return path


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command("ls")
def ls(root: Annotated[Path | None, typer.Argument(help="Folder to search [default: $MEDFM_OUTPUT/features].")] = None) -> None:
    """A table of the caches under ROOT."""
    root = root or default_root()
    table = Table("backbone", "dataset", "train", "val", "test", "size", "complete", "file")
    for path in cache_files(root):
        try:
            d = describe(path)
        except OSError:
            table.add_row("?", "?", "", "", "", _size(path.stat().st_size), "[red]unreadable[/]", str(path))
            continue
        meta = d["meta"]
        rows = {s: f"{r}/{n}" if r != n else str(n) for s, (r, n) in d["rows"].items()}
        random = " [red](random weights)[/]" if meta.get("backbone", {}).get("random_weights") else ""
        table.add_row(meta.get("backbone", {}).get("name", "?") + random, meta.get("dataset", {}).get("name", "?"),
                      rows.get("train", ""), rows.get("val", ""), rows.get("test", ""), _size(d["size"]),
                      "[green]yes[/]" if d["complete"] else "[yellow]no[/]", str(path))
    if not table.row_count:
        console.print(f"no caches under {root}")
        return
    console.print(table)


@app.command()
def info(path: Annotated[Path, typer.Argument(help="A cache file.")]) -> None:
    """Everything a cache records: settings, backbone, dataset, task, rows and arrays."""
    d = describe(_existing(path))
    console.print_json(json.dumps(d, default=str))


@app.command("verify")
def verify_cmd(path: Annotated[Path, typer.Argument(help="A cache file.")]) -> None:
    """Check row counts, shapes, finite values and the complete mark; exit 1 on problems."""
    problems = verify(_existing(path))
    if problems:
        for p in problems:
            console.print(f"[red]problem[/] {p}")
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {path}")


@app.command()
def rm(paths: Annotated[list[Path], typer.Argument(help="Cache files to delete.")]) -> None:
    """Delete caches (and their split manifests)."""
    for path in paths:
        _existing(path)
        if not is_cache_file(path):
            raise MedfmError(f"{path} is not a cache file (*.h5, *.h5.partial or a shard *.h5.shardKofN); nothing removed")
    for path in paths:
        path.unlink()
        final = Path(str(path).removesuffix(PARTIAL_SUFFIX))
        if final.suffix == ".h5" and not final.exists() and not partial_path(final).exists():
            final.with_suffix(".splits.json").unlink(missing_ok=True)  # the manifest goes with its last cache file
        console.print(f"removed {path}")


def main() -> None:
    run_cli(app, "cache")
