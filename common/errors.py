"""The user-facing error type: a `MedfmError` is a user mistake or a bad input.

The CLIs print its message as one line and exit 2 (`common.cli.run_cli`), never a traceback.
"""

from __future__ import annotations


class MedfmError(Exception):
    """Bad input or state the user can fix; the message says what was wrong and what to do."""
