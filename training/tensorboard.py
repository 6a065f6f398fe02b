"""TensorBoard scalars of every training run, probe and finetune alike: one point per epoch, in the run's folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from torch.utils.tensorboard import SummaryWriter


def scalar_writer(run_dir: Path) -> SummaryWriter:
    """A TensorBoard writer into a run's folder (`tensorboard --logdir outputs/runs` shows every run); one point per
    epoch (`add_epoch`), never per step, so it costs milliseconds."""
    from torch.utils.tensorboard import SummaryWriter  # on use: the import costs a CLI's start otherwise

    return SummaryWriter(str(run_dir))


def add_epoch(writer: SummaryWriter, epoch: int, train_loss: float, metric: str, val_score: float, lr: float) -> None:
    """The scalars every training run (probe and finetune) writes per epoch: train loss, validation primary metric, lr."""
    writer.add_scalar("train/loss", train_loss, epoch)
    writer.add_scalar(f"val/{metric}", val_score, epoch)
    writer.add_scalar("lr", lr, epoch)
