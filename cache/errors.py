"""The user-facing error type and the CLI entry wrapper shared by every stage.

They live in `cache` because it is the one package every stage may import (it imports none).
A `MedfmError` is a user mistake or a bad input: the CLIs print its message as one line and exit 2,
never a traceback.
"""

from __future__ import annotations

import sys

import typer


class MedfmError(Exception):
    """Bad input or state the user can fix; the message says what was wrong and what to do."""


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
