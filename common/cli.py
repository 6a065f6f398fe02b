"""What every command line shares: the entry wrapper (one `error:` line, exit 2) and the KEY=VALUE parsers."""

from __future__ import annotations

import ast
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer

from common.errors import MedfmError

INTERRUPTED = "interrupted; partial outputs are kept and resume on the next run"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESEND_S = 0.05  # a stop signal whose exception was lost is sent again this much later (`_stop_signals_raise`)


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised in the main thread where the command is.

    A BaseException, so that no `except Exception` swallows it and typer, which turns KeyboardInterrupt
    into a silent exit 130, lets it through; `finally` blocks and context managers run on the way out,
    so a partial file is closed whole and resumes on the next run.
    """

    def __init__(self, signum: int, lost: Callable[[int], None] | None = None) -> None:
        super().__init__(signum)
        self.signum = signum
        self.lost = lost  # called when the exception is dropped unraised: Python swallowed it (see `_stop_signals_raise`)

    def __del__(self) -> None:
        if self.lost is not None:
            self.lost(self.signum)


def run_cli(app: typer.Typer, prog_name: str, interrupted: str = INTERRUPTED) -> None:
    """Run a typer app so that user mistakes end in one `error:` line and exit code 2.

    SIGINT and SIGTERM end the command with one line, `interrupted` (what was kept and how to go on),
    and exit code 128 + the signal (130, 143). Warnings are printed as one `warning:` line each.
    """
    try:
        with _stop_signals_raise() as received, _one_line_warnings():
            code = _run(app, prog_name)
        if received:  # the signal's exception was swallowed where Python ignores exceptions (a fork hook): still stopped
            raise Interrupted(received[0])
    except (Interrupted, KeyboardInterrupt) as err:  # KeyboardInterrupt: where no handler could be set (not the main thread)
        sys.stderr.write(one_line(interrupted) + "\n")
        sys.exit(128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT))
    sys.exit(code)


def _run(app: typer.Typer, prog_name: str) -> int:
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
    return code if isinstance(code, int) else 0


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.exit(2)


def one_line(message: str) -> str:
    """`message` on one line, printable: a file name that is not UTF-8 shows its odd bytes as \\xNN."""
    message = " ".join(message.split())
    try:
        return message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace").decode("utf-8")


@contextmanager
def _stop_signals_raise() -> Iterator[list[int]]:
    """While the command runs, SIGINT and SIGTERM raise `Interrupted` in the main thread (then the old handlers return).

    An exception raised where Python ignores exceptions (an at-fork hook while a DataLoader starts its workers) is
    dropped unraised: the signal is then sent again (`Interrupted.lost`), unless the command has stopped meanwhile.
    The signals received are yielded, for the caller to check when the command returns before the second one lands.
    """
    received: list[int] = []
    stopped = threading.Event()
    guard = threading.Lock()  # the old handlers come back only when no second signal is on its way

    def send_again(signum: int) -> None:
        def later() -> None:
            time.sleep(RESEND_S)  # out of the hook that swallowed the first one
            with guard:
                if not stopped.is_set():
                    os.kill(pid, signum)

        threading.Thread(target=later, name="resend-signal", daemon=True).start()

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != pid:  # a forked worker (a DataLoader's) inherited this handler: act as it would by default
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        raise Interrupted(signum, lost=send_again)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        with guard:
            stopped.set()
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (ours, and the libraries') as one `warning:` line each, without a source line or file name."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' signature
        (file or sys.stderr).write(f"warning: {one_line(str(message))}\n")

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def parse_options(pairs: list[str], flag: str = "--opt") -> dict[str, str]:
    """`["key=value", ...]` -> {"key": "value"}; dashes in keys become underscores (keyword arguments)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedfmError(f"{flag} expects KEY=VALUE, got '{pair}'")
        out[key.replace("-", "_")] = value
    return out


def dataset_options(pairs: list[str] | None, split_seed: int | None, frames: str = "middle") -> dict[str, object]:
    """--opt KEY=VALUE pairs plus --split-seed and --frames: what shapes the dataset (its builder's keyword arguments,
    and which frames of multi-frame files are samples; the default frames stay unsaid, so fingerprints keep)."""
    options: dict[str, object] = dict(parse_options(pairs or []))
    if split_seed is not None:
        options["split_seed"] = split_seed
    if frames != "middle":
        options["frames"] = frames
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
