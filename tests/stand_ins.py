"""Stand-ins for the commands a Makefile target calls, so a test runs the target itself and reads what it called."""

from __future__ import annotations

# a command that appends its name, arguments and MEDFM_OUTPUT to the file `{log}`, and does nothing else
RECORDER = """#!/bin/sh
echo "MEDFM_OUTPUT=$MEDFM_OUTPUT $(basename "$0") $*" >> "{log}"
"""
