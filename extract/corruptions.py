"""Corrupted test views (docs/robustness.md §1): which corruptions exist, how `--corrupt KIND:SEVERITY` reads, and
how one image is corrupted.

The corruptions are the ImageNet-C set of the `imagecorruptions` package (its maintained fork `imagecorruptions-imaug`),
applied to the resized image. Every random draw comes from the seed given, so an image is corrupted the same way in any
process. Nothing here imports torch, so the command line checks `--corrupt` before the models load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from common.errors import MedfmError
from common.registry import unknown

# imagecorruptions' `get_corruption_names("all")`, in its order: the 15 ImageNet-C corruptions, then its 4 extra ones
# (tests/extract/test_corruptions.py checks the two agree, so the command line needs no import of the library)
KINDS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow",
         "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression", "speckle_noise",
         "gaussian_blur", "spatter", "saturate")
CLEAN = "none"  # `--corrupt none` (or any KIND:0): the clean test view, which is the clean cache itself
ALL = "all"  # `--corrupt all:S`: every kind at severity S
MAX_SEVERITY = 5
MIN_SIDE = 32  # imagecorruptions refuses images smaller than this on either side
CORRUPT_VIEW = -1  # the view index of corrupted draws in `extract.transforms.view_seed`, apart from augmented views 0..K-1
SEED_ARGUMENT = ("glass_blur", "impulse_noise")  # these take the seed as an argument; the rest draw from numpy's global stream
SYNTAX = "KIND:SEVERITY[,KIND:SEVERITY...], e.g. gaussian_noise:3,all:1"


@dataclass(frozen=True)
class Corruption:
    """One corrupted view: a kind at a severity (1-5), drawn from `seed`; severity 0 or kind `none` is the clean view."""

    kind: str
    severity: int
    seed: int = 0

    @property
    def clean(self) -> bool:
        return self.kind == CLEAN or self.severity == 0

    @property
    def tag(self) -> str:
        """How the view's cache file is named after its clean cache: `<clean stem>+<tag>.h5`."""
        return f"{self.kind}-{self.severity}"

    def to_dict(self) -> dict[str, Any]:
        """What the view's cache records (`CacheMeta.corruption`) and adds to its settings (`corrupt`)."""
        return asdict(self)


def parse_corruptions(text: str, seed: int = 0) -> tuple[Corruption, ...]:
    """`gaussian_noise:3,all:1` -> the distinct views asked for, in order; `none` or `KIND:0` stays as a clean view."""
    wanted: dict[tuple[str, int], Corruption] = {}
    for item in (part.strip() for part in text.split(",")):
        for kind, severity in _parse_item(item):
            wanted.setdefault((kind, severity), Corruption(kind, severity, seed))
    return tuple(wanted.values())


def _parse_item(item: str) -> list[tuple[str, int]]:
    if item == CLEAN:
        return [(CLEAN, 0)]
    kind, colon, level = item.partition(":")
    if not colon or not kind:
        raise MedfmError(f"--corrupt takes {SYNTAX}; got '{item}'")
    if kind not in (*KINDS, ALL, CLEAN):
        raise unknown("corruption", kind, (*KINDS, ALL, CLEAN), "docs/robustness.md §1")
    if not (level.isascii() and level.isdigit()) or int(level) > MAX_SEVERITY:  # isdigit alone takes '³', which int() refuses
        raise MedfmError(f"--corrupt {item}: the severity must be a whole number from 0 (the clean view) to {MAX_SEVERITY}, "
                         f"got '{level}'")
    return [(k, int(level)) for k in KINDS] if kind == ALL else [(kind, int(level))]


def corrupt_image(image: Image.Image, corruption: Corruption, seed: int) -> Image.Image:
    """`image` (RGB or gray) under `corruption`, every draw from `seed` (< 2**32); same size and mode back.

    A gray image is corrupted as RGB with three equal channels (how the library takes it), then turned gray again.
    The global numpy stream the library draws from is seeded for the call and restored after it.
    """
    from imagecorruptions import corrupt  # numba and OpenCV load with it: only once an image is corrupted

    if corruption.clean:
        return image
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        extra = {"seed": seed} if corruption.kind in SEED_ARGUMENT else {}
        out = corrupt(np.asarray(image), severity=corruption.severity, corruption_name=corruption.kind, **extra)
    finally:
        np.random.set_state(state)
    return Image.fromarray(out).convert(image.mode)
