"""GPU-hours a grid will cost, estimated before anything runs (docs/grid.md §7).

An estimate, not a measurement: images per job (the study's split sizes) times epochs or views, divided by a
nominal forward throughput per backbone (one A100-class GPU, bf16, 224 px, from each model's FLOPs). Training
costs about three forwards per image (forward + backward); validation and test one. Image decoding, which often
bounds an extraction of large JPEGs, is not counted, so real runs take longer, never much shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

# Forward images per second on one GPU (A100-class, bf16, 224 px, large batches); nominal, from FLOPs.
FORWARD_IMAGES_PER_S = {
    "deit": 3000, "dino": 3000, "blip": 3000, "openclip": 3000,  # ViT-B/16, 196 tokens
    "dinov2": 2300,  # ViT-B/14 at 224 px: 256 tokens
    "sam": 2500,  # ViT-B/16 with windowed attention and relative positions
    "seem": 4000,  # Focal-T
    "resnet152": 2500,
}
UNKNOWN_BACKBONE_IMAGES_PER_S = 2000  # a backbone registered later, not in the table
DEIT_HEAD_IMAGES_PER_S = 3000  # the appended DeiT-B head on 196 tokens: a DeiT-B forward without its patch embedding
LINEAR_ROWS_PER_S = 500_000  # a linear head on cached pooled features: memory-bound, seconds for the largest dataset
TRAIN_COST = 3  # forward + backward, in forwards


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


def _rate(backbone: str) -> float:
    return FORWARD_IMAGES_PER_S.get(backbone, UNKNOWN_BACKBONE_IMAGES_PER_S)


def extraction_hours(backbone: str, dataset: str, views: int) -> float | None:
    """One forward of every image, and of the train split once more per augmented view."""
    n = sizes(dataset)
    return None if n is None else (n.total + n.train * views) / _rate(backbone) / 3600


def probe_hours(dataset: str, heads: tuple[str, ...], epochs: int, seeds: int) -> float | None:
    """Heads on cached features: the DeiT head trains and evaluates on the tokens; linear heads cost seconds."""
    n = sizes(dataset)
    if n is None:
        return None
    seconds = 0.0
    for head in heads:
        if head == "deit":
            seconds += seeds * epochs * (n.train * TRAIN_COST + n.val) / DEIT_HEAD_IMAGES_PER_S
        else:
            seconds += seeds * epochs * (n.train + n.val) / LINEAR_ROWS_PER_S
    return seconds / 3600


def finetune_hours(backbone: str, dataset: str, head: str, frozen: bool, epochs: int) -> float | None:
    """Live images every epoch: a frozen backbone only forwards, an unfrozen one trains; a DeiT head adds its own cost."""
    n = sizes(dataset)
    if n is None:
        return None
    backbone_s = (n.train * (1 if frozen else TRAIN_COST) + n.val) / _rate(backbone)
    head_s = (n.train * TRAIN_COST + n.val) / DEIT_HEAD_IMAGES_PER_S if head == "deit" else 0.0
    test_s = n.test / _rate(backbone)
    return (epochs * (backbone_s + head_s) + test_s) / 3600
