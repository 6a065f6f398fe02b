"""`python -m grid run ...`, the same as the `grid` command."""

from grid.cli import main

main()
