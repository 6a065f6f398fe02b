"""`python -m probe sweep ...`: how a grid job starts a probe stage, the same as the `probe` command."""

from probe.cli import main

main()
