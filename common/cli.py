"""What every command line shares: the entry wrapper (one `error:` line, exit 2) and the KEY=VALUE parsers."""

from __future__ import annotations

import ast
import sys

import typer

from common.errors import MedfmError


def run_cli(app: typer.Typer, prog_name: str) -> None:
    """Run a typer app so that user mistakes end in one `error:` line and exit code 2."""
    try:
        code = app(standalone_mode=False, prog_name=prog_name)
    except MedfmError as err:
        _fail(str(err))
    except typer.Abort:
        _fail("aborted")
    except typer.TyperException as err:  # typer's (vendored click) usage and parameter errors
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: show its help
            sys.stderr.write(err.format_message() + "\n")
            sys.exit(2)
        _fail(err.format_message())
    except KeyboardInterrupt:
        _fail("interrupted; partial outputs are kept and resume on the next run")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    message = " ".join(message.split())
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def parse_options(pairs: list[str], flag: str = "--opt") -> dict[str, str]:
    """`["key=value", ...]` -> {"key": "value"}; dashes in keys become underscores (keyword arguments)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedfmError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key.replace("-", "_")] = value
    return out


def dataset_options(pairs: list[str] | None, split_seed: int | None) -> dict[str, object]:
    """--opt KEY=VALUE pairs plus --split-seed: what shapes the dataset (its builder's keyword arguments)."""
    options: dict[str, object] = dict(parse_options(pairs or []))
    if split_seed is not None:
        options["split_seed"] = split_seed
    return options


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`embed_dim=32` -> {"embed_dim": 32}: values are Python literals (numbers, tuples), else strings."""
    out: dict[str, object] = {}
    for key, value in parse_options(pairs, "--override").items():
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out
