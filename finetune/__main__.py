"""`python -m finetune run ...`; also `torchrun --nproc_per_node N -m finetune run ...`."""

from finetune.cli import main

main()
