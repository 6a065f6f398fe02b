"""`python -m extract run ...`; also `torchrun --nproc_per_node N -m extract run ...` (one shard per process)."""

from extract.cli import main

main()
