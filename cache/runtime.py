"""Choosing the device, shared by extract, probe and finetune.

It lives in `cache` because that is the one package every stage may import (it imports none).
"""

from __future__ import annotations

import torch

from cache.errors import MedfmError


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; a named device must exist here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MedfmError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedfmError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    return dev
