"""The sweep the fault tests kill and resume, shared by the test and the process it starts: four linear heads trained
side by side in one group (2 learning rates x 2 seeds), for long enough to be killed while they train."""

from __future__ import annotations

from probe.config import TrainConfig
from probe.sweep import Grid

GRID = Grid(heads=("linear",), lrs=(1e-3, 1e-2), seeds=(0, 1))
BASE = TrainConfig(epochs=400, batch_size=16, warmup_steps=9, solver="adamw")  # 400 epochs x 9 steps: seconds, where the kill
# takes milliseconds; the AdamW loop, which trains heads side by side epoch after epoch (the L-BFGS probe has no epochs)
