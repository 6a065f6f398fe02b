"""Where outputs go, which device runs, and this process's place in a torchrun launch; shared by every stage.

It lives in `common`, which every stage may import.
torch is imported on use, so that a CLI's `--help` and early errors do not wait seconds for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import MedfmError

if TYPE_CHECKING:
    import torch

OUTPUT_ENV = "MEDFM_OUTPUT"
MAX_WORKERS = 12  # image-decoding workers beyond this feed no GPU faster


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


def device_label(device: torch.device | str) -> str:
    """What a cost was paid on, as the ledger and cache meta record it: `cpu`, or `cuda (NVIDIA H200)`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def device_kind(label: str) -> str:
    """`GPU` for a recorded device other than the CPU, `CPU` for the CPU, "" when none was recorded."""
    return "" if not label else ("CPU" if label.split()[0] == "cpu" else "GPU")


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


def cpu_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(workers: int | None) -> None:
    """`--workers`: None (the default) or 0 (decode in the main process) or more; said before any work starts."""
    if workers is not None and workers < 0:
        raise MedfmError(f"--workers must be 0 (decode in the main process) or more, got {workers}")


def check_folder(path: Path | None, flag: str, writable: bool = True) -> None:
    """A folder to write into may be missing (it is made), never a file, nor read-only where it will be written
    (`writable`; a folder whose complete caches are only reused may be read-only): one line now, not an OSError later."""
    if path is None:
        return
    path = Path(path).expanduser()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f" ({existing} is a file)"
        raise MedfmError(f"{flag} {path} is not a folder{where}; give a folder, which is made when missing")
    if writable and existing is not None and not os.access(existing, os.W_OK):
        where = "the folder" if existing == path else existing
        raise MedfmError(f"cannot write into {path}: {where} is read-only; give {flag} a writable folder")


def loader_workers(workers: int | None, device: torch.device | None = None) -> int:
    """`--workers`, else the default for a model running on `device`."""
    return workers if workers is not None else default_workers(device)


def default_workers(device: torch.device | None = None) -> int:
    """Decoding workers for a model running on `device` (None: no model runs alongside).

    With the model on a GPU, or none, every core but one decodes (at most 12). With the model on the
    CPU its threads already fill the cores and a worker fights them for the same cores: on 2 cores, decoding
    in-line gave 0.88-0.98 (ViT) and 0.79-0.97 (CNN) of the bare forward's speed in nine runs of one day, 2 workers
    0.81-0.95 and 0.76-0.87 (bench/extraction.py).
    So up to 4 cores decode in-line, and larger CPUs lend a quarter of their cores to decoding.
    """
    cores = cpu_cores()
    if device is not None and device.type == "cpu":
        return 0 if cores <= 4 else min(MAX_WORKERS, cores // 4)
    return min(MAX_WORKERS, cores - 1)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Small tensor work on one torch thread: the same operations, without the threads' fork and join.

    On a shared CPU the threads wait on each other whenever another process holds a core, which costs small operations
    more than the operations themselves: one image's eval transform took 46 ms on 2 threads and 0.7 ms on 1
    (`extract.datasets.images.ImageDataset`), a lone linear head's training 2.9-4.3 s against 0.6-1.0 s
    (`probe.train.small_on_one_thread`), on a 2-core machine with other jobs running.
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
