"""Where outputs go and which device runs, shared by extract, probe and finetune.

It lives in `cache` because that is the one package every stage may import (it imports none).
torch is imported on use, so that a CLI's `--help` and early errors do not wait seconds for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cache.errors import MedfmError

if TYPE_CHECKING:
    import torch

OUTPUT_ENV = "MEDFM_OUTPUT"


def output_root() -> Path:
    """The outputs folder: features/, runs/ (and the ledger), reports/; $MEDFM_OUTPUT, else ./outputs."""
    return Path(os.environ.get(OUTPUT_ENV, "outputs"))


def resolve_device(device: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; a named device must exist here."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MedfmError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedfmError(f"device '{device}' asked for but CUDA is not available here; use --device cpu")
    return dev
