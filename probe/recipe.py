"""The study's optimisation recipe (paper.md §5), shared by probe and finetune.

AdamW with weight decay on weights only (no decay on biases and any 1-D parameter), and a linear
warmup then a constant learning rate.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases plus every 1-D parameter (norms) without decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """LR rises linearly over `warmup_steps` optimizer steps (call `.step()` after each), then stays constant."""
    warmup_steps = max(0, int(warmup_steps))
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
