"""Where outputs go, which device runs, and this process's place in a torchrun launch; shared by every stage.

It lives in `cache` because that is the one package every stage may import (it imports none).
torch is imported on use, so that a CLI's `--help` and early errors do not wait seconds for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch, as torchrun's environment names it; 0 of 1 when started alone."""

    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_launch() -> Launch:
    env = os.environ
    return Launch(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def rank_device(device: torch.device, launch: Launch) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK, whatever CUDA index was asked for."""
    import torch

    if launch.size == 1 or device.type != "cuda":
        return device
    if launch.local_rank >= torch.cuda.device_count():
        raise MedfmError(f"torchrun started more processes per node than there are GPUs ({torch.cuda.device_count()}); "
                         "lower --nproc_per_node")
    device = torch.device("cuda", launch.local_rank)
    torch.cuda.set_device(device)
    return device
