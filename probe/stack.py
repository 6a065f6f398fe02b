"""Several heads trained as one model: logits [H, B, C] from one batch, each head with its own recipe.

A sweep trains many heads over one pass of the data (DINOv2's linear evaluation does the same). What
must stay per head, so that a head trained here equals the head trained alone, is its learning rate,
weight decay, gradient clipping and kept weights. `LinearStack` holds linear heads as one [H, C, D]
weight, so that each step costs a handful of tensor ops whatever H is; torch's AdamW has one scalar lr
per parameter group, hence `StackedAdamW`, the same update with a learning rate and decay per head.
`ModuleStack` runs any other heads (DeiT) side by side with an AdamW group pair per head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from training.heads import LinearHead
from training.recipe import param_groups

HeadState = dict[str, torch.Tensor]


class StackedAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, decoupled decay) over tensors whose first axis is the head, one lr and decay per head.

    `lrs` [H] and each group's `weight_decay` [H] sit on the parameters' device. Each group's `lr` is a
    multiplier on the per-head rates, so torch's LR schedulers drive it as usual.
    """

    def __init__(self, groups: list[dict], lrs: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(groups, {"lr": 1.0, "head_lr": lrs, "weight_decay": torch.zeros_like(lrs), "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: ARG002 - torch's signature
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                shape = (-1,) + (1,) * (param.ndim - 1)  # per-head values broadcast over the head's slice
                lr = (group["lr"] * group["head_lr"]).view(shape)
                param.mul_(1 - lr * group["weight_decay"].view(shape))
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
                param.sub_(lr / (1 - beta1 ** state["step"]) * state["exp_avg"] / denom)


class LinearStack(nn.Module):
    """H linear heads as one layer: weight [H, C, D], bias [H, C], and each head's standardization [H, D]."""

    def __init__(self, heads: Sequence[LinearHead]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([h.linear.weight.detach() for h in heads]))
        self.bias = nn.Parameter(torch.stack([h.linear.bias.detach() for h in heads]))
        self.register_buffer("shift", torch.stack([h.shift for h in heads]))
        self.register_buffer("scale", torch.stack([h.scale for h in heads]))
        # A sweep's heads standardize alike (or not at all): then one [B, D] input feeds one matmul for all
        # heads, 5x faster per step than a batched matmul over H copies of the input.
        self.shared_input = self._inputs_alike()

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, classes, _ = self.weight.shape
        if self.shared_input:
            logits = ((x - self.shift[0]) / self.scale[0]) @ self.weight.flatten(0, 1).T  # [B, H * C]
            return logits.view(len(x), heads, classes).transpose(0, 1) + self.bias[:, None, :]
        standardized = (x - self.shift[:, None, :]) / self.scale[:, None, :]  # [H, B, D]
        return torch.baddbmm(self.bias[:, None, :], standardized, self.weight.transpose(1, 2))

    def optimizer(self, lrs: Sequence[float], weight_decays: Sequence[float]) -> StackedAdamW:
        """Each head's lr; its weight decay on its weights, none on its bias (the study's recipe)."""
        on_device = {"dtype": torch.float32, "device": self.weight.device}  # per-head rates live beside the weights
        groups = [{"params": [self.weight], "weight_decay": torch.tensor(weight_decays, **on_device)}, {"params": [self.bias]}]
        return StackedAdamW(groups, torch.tensor(lrs, **on_device))

    def head_lr(self, optimizer: torch.optim.Optimizer, k: int) -> float:
        return float(optimizer.param_groups[0]["lr"] * optimizer.param_groups[0]["head_lr"][k])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> None:
        """Scale each head's gradient to norm <= max_norm, as clip_grad_norm_ on that head alone would."""
        norms = (self.weight.grad.square().sum(dim=(1, 2)) + self.bias.grad.square().sum(dim=1)).sqrt()
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        self.weight.grad.mul_(factor[:, None, None])
        self.bias.grad.mul_(factor[:, None])

    def head_state(self, k: int) -> HeadState:
        """Head k's state dict in LinearHead's layout, copied to the CPU."""
        parts = {"linear.weight": self.weight, "linear.bias": self.bias, "shift": self.shift, "scale": self.scale}
        return {name: tensor[k].detach().to("cpu", copy=True) for name, tensor in parts.items()}

    @torch.no_grad()
    def load_head_state(self, k: int, state: HeadState) -> None:
        for name, tensor in (("linear.weight", self.weight), ("linear.bias", self.bias), ("shift", self.shift), ("scale", self.scale)):
            tensor[k].copy_(state[name])
        self.shared_input = self._inputs_alike()

    def _inputs_alike(self) -> bool:
        return bool((self.shift == self.shift[0]).all() and (self.scale == self.scale[0]).all())


class ModuleStack(nn.Module):
    """Any heads side by side (one forward each), each with its own AdamW groups and clipping."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])

    def optimizer(self, lrs: Sequence[float], weight_decays: Sequence[float]) -> torch.optim.AdamW:
        groups = [dict(group, lr=lr) for head, lr, wd in zip(self.heads, lrs, weight_decays, strict=True) for group in param_groups(head, wd)]
        return torch.optim.AdamW(groups, lr=lrs[0])

    def head_lr(self, optimizer: torch.optim.Optimizer, k: int) -> float:
        return float(optimizer.param_groups[2 * k]["lr"])

    def clip_grad_norm_(self, max_norm: float) -> None:
        for head in self.heads:
            torch.nn.utils.clip_grad_norm_(head.parameters(), max_norm)

    def head_state(self, k: int) -> HeadState:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.heads[k].state_dict().items()}

    def load_head_state(self, k: int, state: HeadState) -> None:
        self.heads[k].load_state_dict(state)


def stack_heads(heads: Sequence[nn.Module]) -> LinearStack | ModuleStack:
    """One LinearStack when every head is linear, else the heads side by side."""
    return LinearStack(heads) if all(isinstance(h, LinearHead) for h in heads) else ModuleStack(heads)
