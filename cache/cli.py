"""`cache`: list, inspect, verify and remove feature caches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import h5py
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cache.store import PARTIAL_SUFFIX, describe, is_cache_file, partial_path, verify
from common.cli import run_cli
from common.errors import MedfmError
from common.locks import holder
from common.runtime import output_root

app = typer.Typer(help="Inspect and manage HDF5 feature caches.", no_args_is_help=True, add_completion=False)
console = Console()
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of every HDF5 file medfm writes
CACHE_ATTRS = ("schema_version", "fingerprint")  # what makes an HDF5 file a medfm cache, in every schema version


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
def ls(root: Annotated[Path | None, typer.Argument(help="Folder to search.", show_default="$MEDFM_OUTPUT/features")] = None) -> None:
    """A table of the caches under ROOT: backbone, dataset, rows, size, file, and the settings that tell same-named caches
    apart. Narrow terminals (80 columns) keep every header whole: long cells wrap, none is cut."""
    root = root or default_root()
    table = Table(title=f"caches under {root}", caption="rows: train/val/test",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in ("backbone", "dataset", "rows", "size"):
        table.add_column(header, no_wrap=True)
    table.add_column("file", overflow="fold", min_width=20)
    table.add_column("settings", overflow="fold", min_width=len("settings"))
    listed = []
    for path in cache_files(root):
        try:
            listed.append((path, describe(path)))
        except OSError:
            table.add_row("?", "?", "", _size(path.stat().st_size), f"{_under(path, root)} [red](unreadable)[/]", "")
    settings = cache_settings([d for _, d in listed])
    randoms = 0
    for (path, d), text in zip(listed, settings, strict=True):
        meta = d["meta"]
        counts = [d["rows"].get(s, (0, 0)) for s in ("train", "val", "test")]
        rows = "/".join(str(r) for r, _ in counts)
        random = bool(meta.get("backbone", {}).get("random_weights"))
        randoms += random
        written, planned = (sum(c) for c in zip(*counts, strict=True))
        file = _under(path, root) + ("" if d["complete"] else f" [yellow](incomplete: {written} of {planned} rows)[/]")
        table.add_row(meta.get("backbone", {}).get("name", "?") + (" [red]*[/]" if random else ""), meta.get("dataset", {}).get("name", "?"),
                      rows, _size(d["size"]), file, escape(text))
    if not table.row_count:
        console.print(f"no caches under {root}")
        return
    console.print(table)
    if randoms:
        console.print("[red]*[/] features of a RANDOMLY initialised backbone (--weights random)")


def _under(path: Path, root: Path) -> str:
    """The path relative to the listed root when it lies under it (shorter), else in full."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def cache_settings(described: list[dict[str, Any]]) -> list[str]:
    """Per cache: its inputs (`224 px, 3 ch, norm model, bicubic`), its corruption (`corrupt gaussian_noise-3`, a corrupted
    test view: docs/robustness.md §1), plus every other setting in which it differs from a cache of the same backbone and
    dataset (`root=/data/a`, `layers=[8, 11]`), so same-named caches read apart."""
    flat = [_flatten(d["meta"].get("settings", {})) for d in described]
    names = [(d["meta"].get("backbone", {}).get("name"), d["meta"].get("dataset", {}).get("name")) for d in described]
    shown = ("transform.size", "transform.channels", "norm.kind", "transform.interpolation")
    out = []
    for i, f in enumerate(flat):
        twins = [g for j, g in enumerate(flat) if j != i and names[j] == names[i]]
        parts = [] if not f else [f"{f.get('transform.size', '?')} px", f"{f.get('transform.channels', '?')} ch",
                                  f"norm {f.get('norm.kind', '?')}", str(f.get("transform.interpolation", "?"))]
        if "corrupt.kind" in f:
            parts.append(f"corrupt {f['corrupt.kind']}-{f.get('corrupt.severity')}")
        differing = sorted({k for g in twins for k in {*f, *g} if g.get(k) != f.get(k) and not k.startswith("corrupt.")} - set(shown))
        parts += [f"{k}={_brief(f.get(k))}" for k in differing]
        out.append(", ".join(parts) or "-")
    return out


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"norm": {"kind": "model"}} -> {"norm.kind": "model"}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _brief(value: Any) -> str:
    """A setting's value in a table cell: a hash cut to its first 12 digits, anything else whole."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:12] + "..." if len(text) >= 32 and all(c in "0123456789abcdef" for c in text) else text


@app.command()
def info(path: Annotated[Path, typer.Argument(help="A cache file.")]) -> None:
    """Everything a cache records: settings, backbone, dataset, task, rows and arrays."""
    _existing(path)
    _refuse_busy(path, "run `cache info` when it has finished")
    problem = identify(path)
    if problem is not None:
        raise MedfmError(f"{path} {problem.reason}; {problem.advice(path)}")
    try:
        d = describe(path)
    except (OSError, KeyError, ValueError) as err:
        raise MedfmError(f"cannot read {path} as a medfm cache ({_first_line(err)}); `cache verify {path}` lists its problems") from None
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
def rm(
    paths: Annotated[list[Path], typer.Argument(help="Cache files to delete.")],
    force: Annotated[bool, typer.Option("--force", help="Also remove a cache file too damaged to open (truncated, a broken "
                                                        "header); never a file that opens and is not a medfm cache.", show_default="off")] = False,
) -> None:
    """Delete caches (and their split manifests): only files that are medfm caches, partial caches or their shards.

    A file is a medfm cache when its name says so (*.h5, *.h5.partial, *.h5.shardKofN) and it is an HDF5 file
    holding medfm's `schema_version` and `fingerprint` attributes. An HDF5 file too damaged to open cannot
    show them: it is removed only with --force. Anything else (a text file named *.h5, another program's
    HDF5 file), and a cache an extraction is writing now, is refused and nothing is removed.
    """
    for path in paths:
        _existing(path)
        if not is_cache_file(path):
            raise MedfmError(f"{path} is not a cache file (*.h5, *.h5.partial or a shard *.h5.shardKofN); nothing removed")
        _refuse_busy(path, "stop it first, or let it finish; nothing removed")
        problem = identify(path)
        if problem is not None and not (force and problem.damaged):
            hint = "pass --force to remove it anyway" if problem.damaged else "remove it yourself if you mean it"
            raise MedfmError(f"{path} {problem.reason}; {hint}; nothing removed")
    for path in paths:
        path.unlink()
        final = Path(str(path).removesuffix(PARTIAL_SUFFIX))
        if final.suffix == ".h5" and not final.exists() and not partial_path(final).exists():
            final.with_suffix(".splits.json").unlink(missing_ok=True)  # the manifest goes with its last cache file
        console.print(f"removed {path}")


@dataclass(frozen=True)
class NotACache:
    """Why a file is not (or cannot be shown to be) a medfm cache."""

    reason: str  # completes "<path> ..."
    damaged: bool  # an HDF5 file that does not open: perhaps a damaged cache

    def advice(self, path: Path) -> str:
        if self.damaged:
            return f"it is damaged (truncated?): `cache verify {path}` says more, `cache rm --force {path}` removes it"
        return "pass a cache file (see `cache ls`)"


def identify(path: Path) -> NotACache | None:
    """None when `path` is a medfm cache: an HDF5 file with medfm's `schema_version` and `fingerprint` attributes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
    except OSError as err:
        return NotACache(f"cannot be read ({err.strerror})", False)
    if head != HDF5_SIGNATURE:
        return NotACache("is not an HDF5 file, so not a medfm cache", False)
    try:
        with h5py.File(path, "r", locking=False) as file:
            missing = [name for name in CACHE_ATTRS if name not in file.attrs]
    except OSError as err:
        return NotACache(f"does not open as HDF5 ({_first_line(err)})", True)
    if missing:
        return NotACache(f"is an HDF5 file but not a medfm cache (it has no {' or '.join(missing)} attribute)", False)
    return None


def _refuse_busy(path: Path, what_to_do: str) -> None:
    """A cache that an extraction holds the lock of is not inspected or removed under its feet."""
    final = Path(str(path).removesuffix(PARTIAL_SUFFIX))
    if (writer := holder(final)) is not None:
        raise MedfmError(f"{path} is being written by {writer}; {what_to_do}")


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main() -> None:
    run_cli(app, "cache", interrupted="interrupted; nothing was changed but the files reported as removed")
