"""The one precision policy, for extraction and training alike.

`auto` runs under autocast on CUDA, in bf16 where the GPU has it and else in fp16 (with a loss scaler when training),
and in fp32 on the CPU, where bf16 is several times slower than fp32 without bf16 units. `fp32`, `bf16` and `fp16` ask
for one of them instead. fp16 training always gets a GradScaler (its gradients underflow without loss scaling); bf16
has fp32's range and needs none. The test split is always scored in fp32 (`training.recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import MedfmError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: fp32) and whether training under it needs a loss scaler."""

    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        import torch

        return self.dtype is torch.float16


def resolve_precision(name: str, device: torch.device, option: str = "--precision") -> Precision:
    """`name` (one of `PRECISIONS`) on `device`, by the rule of the module docstring; another name is one line."""
    import torch

    if name not in PRECISIONS:
        raise MedfmError(f"{option} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return Precision(None)
        return Precision(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return Precision({"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name])


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of precision `name` on `device` (None: fp32), as extraction runs its forward passes."""
    return resolve_precision(name, device).dtype
