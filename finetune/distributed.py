"""torchrun / DDP glue: who am I, which device, and how predictions from all ranks become one set.

Under `torchrun --nproc_per_node N` the environment names this process's rank; without it we are
a world of one and every collective is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.runtime import rank_device, torchrun_launch


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def start(device: torch.device) -> World:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); else a world of one.

    Under torchrun each rank takes the GPU of its LOCAL_RANK, whatever `device` index was asked for.
    """
    launch = torchrun_launch()
    if launch.size == 1:
        return World(0, 1, device)
    device = rank_device(device, launch)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), device)


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_mean(world: World, value: float) -> float:
    """The mean of a per-rank scalar over all ranks (e.g. the training loss)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def gather_predictions(world: World, index: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (labels, logits) as one set in dataset order, each sample once.

    DistributedSampler pads the last round by repeating samples so that all ranks get equal
    counts; gathering by dataset index and keeping the first copy of each index undoes that.
    Every rank must pass the same number of rows (true for a DistributedSampler without drop_last).
    """
    if world.distributed:
        parts = [_all_gather(world, t) for t in (index, labels, logits)]
        index, labels, logits = (torch.cat(p) for p in parts)
    _, first = np.unique(index.cpu().numpy(), return_index=True)
    return labels.cpu().numpy()[first], logits.float().cpu().numpy()[first]


def _all_gather(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    tensor = tensor.to(world.device).contiguous()
    out = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(out, tensor)
    return out
