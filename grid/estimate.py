"""GPU-hours a grid will cost, estimated before anything runs (docs/grid.md §7).

An estimate, not a measurement: the FLOPs of each job (its passes over its images, the study's split sizes, times the
model's forward FLOPs per image) divided by the sustained throughput of one card (`CARD`). A backbone's FLOPs are
counted on the model itself, at the input size its jobs use, by torch's FLOP counter on the meta device (no weights,
no memory, well under a second for the study's models), so any backbone a stage takes, a library one included, gets
its own figure. Training an image costs three forwards (forward + backward); validation and test one. Image decoding,
which often bounds an extraction of large JPEGs, is not counted, so real runs take longer, rarely shorter.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr
from dataclasses import dataclass
from functools import cache

from common.cli import parse_overrides
from common.errors import MedfmError


@dataclass(frozen=True)
class Card:
    """The GPU the hours are for, and the FLOPs per second it sustains on these models in bf16 at large batches."""

    name: str
    sustained_tflops: float

    @property
    def flops_per_s(self) -> float:
        return self.sustained_tflops * 1e12


# An A100's bf16 tensor cores peak at 312 TFLOP/s dense; large-batch ViT forwards and training steps under autocast
# sustain about a third of that (attention's softmax, norms and activations are memory-bound): docs/grid.md §7.
CARD = Card("A100", 100.0)
DEIT_HEAD_WIDTH, DEIT_HEAD_DEPTH = 768, 12  # the study's appended DeiT-B head
LINEAR_ROWS_PER_S = 500_000  # a linear head on cached pooled features: memory-bound, seconds for the largest dataset
TRAIN_COST = 3  # forward + backward, in forwards
ADAPTER_TRAIN_COST = 2  # an adapter in a frozen backbone: forward + the backward to the activations, no weight gradients


@dataclass(frozen=True)
class ModelCost:
    """What one image costs a backbone at `image_size`: its forward FLOPs, and the tokens an appended DeiT head reads."""

    backbone: str
    image_size: int
    flops: float
    tokens: int
    token_dim: int

    @property
    def head_flops(self) -> float:
        """The DeiT-B head's forward on these tokens: the projection to its width, then per block the matmuls (qkv,
        output, MLP: 24 N W^2) and attention (4 N^2 W) over the tokens and its CLS token."""
        n, w = self.tokens + 1, DEIT_HEAD_WIDTH
        return 2 * self.tokens * self.token_dim * w + DEIT_HEAD_DEPTH * (24 * n * w * w + 4 * n * n * w)


@cache
def count_model(backbone: str, image_size: int | None = None, overrides: tuple[str, ...] = ()) -> ModelCost:
    """The backbone's cost per image, counted once per process: built on the meta device with random weights (as the
    stage would build it: same size, same constructor overrides) and run on one image under torch's FLOP counter.
    A model that cannot be built or run so is one line saying why; the plan then has no estimate for it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from extract.backbones import create_backbone

    try:  # the model's own description line and warnings belong to the stage that runs it, not to the plan
        with torch.device("meta"), redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_backbone(backbone, "random", image_size=image_size, **parse_overrides(list(overrides)))
            model.requires_grad_(False)  # a forward's count: the counter's module tracking trips on an attention pool's weights
            size = model.data_config.input_size
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                tokens = model(torch.zeros(1, 3, size, size)).tokens
    except MedfmError as err:
        raise MedfmError(f"cannot count {backbone}'s FLOPs: {err}") from None
    except Exception as err:  # noqa: BLE001 - a model that will not run on the meta device: said, never fatal to a plan
        raise MedfmError(f"cannot count {backbone}'s FLOPs on the meta device ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return ModelCost(backbone, size, float(counter.get_total_flops()), int(tokens.shape[1]), int(tokens.shape[2]))


def option(args: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in a stage command (`--image-size 448` or `--image-size=448`), the last one winning."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.partition("=")[2]
    return value


@dataclass(frozen=True)
class SplitSizes:
    train: int
    val: int
    test: int

    @property
    def total(self) -> int:
        return self.train + self.val + self.test


# The study's splits (docs/protocol.md §1); DDSM's lists are the release's, about 2,620 cases x 4 views, so approximate.
SPLIT_SIZES = {
    "aptos2019": SplitSizes(2564, 549, 549),
    "isic2019": SplitSizes(20265, 2533, 2533),
    "ddsm": SplitSizes(8384, 1048, 1048),
    "chexpert": SplitSizes(178700, 22350, 22350),
    "demo": SplitSizes(144, 48, 48),
}


def sizes(dataset: str) -> SplitSizes | None:
    """The dataset's split sizes, or None for data of unknown size (your own folders): no estimate then."""
    return SPLIT_SIZES.get(dataset)


def hours(flops: float) -> float:
    return flops / CARD.flops_per_s / 3600


def extraction_hours(cost: ModelCost | None, dataset: str, views: int) -> float | None:
    """One forward of every image, and of the train split once more per augmented view. Here and below, None: no
    estimate, for data of unknown size or a model that could not be counted (`cost` None)."""
    n = sizes(dataset)
    return None if n is None or cost is None else hours((n.total + n.train * views) * cost.flops)


def probe_hours(cost: ModelCost | None, dataset: str, heads: tuple[str, ...], epochs: int, seeds: int) -> float | None:
    """Heads on cached features: the DeiT head trains and validates on the backbone's tokens; linear heads cost seconds."""
    n = sizes(dataset)
    if n is None or cost is None:
        return None
    total = 0.0
    for head in heads:
        if head == "deit":
            total += hours(seeds * epochs * (n.train * TRAIN_COST + n.val) * cost.head_flops)
        else:
            total += seeds * epochs * (n.train + n.val) / LINEAR_ROWS_PER_S / 3600
    return total


def finetune_hours(cost: ModelCost | None, dataset: str, head: str, frozen: bool, epochs: int, adapter: bool = False) -> float | None:
    """Live images every epoch: a frozen backbone only forwards, an unfrozen one trains, one with an adapter trains it
    through the backbone's activations (its own few FLOPs not counted); a DeiT head adds its own cost."""
    n = sizes(dataset)
    if n is None or cost is None:
        return None
    passes = 1 if frozen else ADAPTER_TRAIN_COST if adapter else TRAIN_COST
    backbone = epochs * (n.train * passes + n.val) + n.test
    head_passes = epochs * (n.train * TRAIN_COST + n.val) + n.test if head == "deit" else 0
    return hours(backbone * cost.flops + head_passes * cost.head_flops)
