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
STUDY_PRECISION = "fp16"  # the study's: fp16 autocast with a GradScaler for training and validation, fp16 extraction


def for_protocol(name: str, protocol: str, device: torch.device) -> str:
    """`auto` under `--protocol study` is the study's precision: fp16 on CUDA (with a GradScaler when training), fp32 on
    the CPU as `auto` is; a name asked for, or medfm's protocol, is kept."""
    if name == "auto" and protocol == "study":
        return STUDY_PRECISION if device.type == "cuda" else "fp32"
    return name


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: fp32) and whether training under it needs a loss scaler."""

    dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        import torch

        return self.dtype is torch.float16

    def describe(self) -> str:
        """`fp32`, `bf16`, or `fp16 + GradScaler` (training) as a run's config records it."""
        name = {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(self.dtype) if self.dtype else None]
        return f"{name} + GradScaler" if self.needs_scaler else name


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
