"""What a dataset folder holds, file by file, before anything is decoded: image modes, bit depths, EXIF orientations,
alpha and DICOM photometric kinds (`extract datasets --inspect`). So a user sees whether medfm's decoding rules
(docs/images.md) touch their data: an EXIF rotation, transparency composited over black, 16-bit samples scaled
min-max to 8 bits, a MONOCHROME1 inversion, frames."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from extract.datasets.base import DatasetSource
from extract.datasets.decode import WIDE_MODES, Frame, is_dicom

EXIF_ORIENTATION = 0x0112
BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "La": 8, "CMYK": 8, "YCbCr": 8, "I;16": 16, "I;16L": 16,
        "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}


@dataclass
class Inventory:
    """Counts over the inspected files of each property that decides how medfm decodes them."""

    files: int = 0
    formats: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    bits: Counter = field(default_factory=Counter)
    orientations: Counter = field(default_factory=Counter)  # EXIF orientation tag, 1 (or absent) is upright
    alpha: int = 0
    frames: Counter = field(default_factory=Counter)
    dicom: Counter = field(default_factory=Counter)  # photometric interpretation
    unreadable: list[str] = field(default_factory=list)

    def effects(self) -> list[str]:
        """What medfm's decoder will do to some of these files, one line each (nothing when all are plain 8-bit)."""
        said = []
        turned = sum(n for o, n in self.orientations.items() if o not in (None, 1))
        if turned:
            said.append(f"{turned} file(s) carry an EXIF orientation other than upright: medfm rotates them as a viewer does")
        if self.alpha:
            said.append(f"{self.alpha} file(s) have transparency: composited over black")
        wide = sum(n for b, n in self.bits.items() if b > 8) + sum(self.dicom.values())
        if wide:
            said.append(f"{wide} file(s) hold more than 8 bits a sample (or DICOM): scaled min-max to 8 bits per image")
        if self.dicom.get("MONOCHROME1"):
            said.append(f"{self.dicom['MONOCHROME1']} DICOM file(s) are MONOCHROME1: inverted so that high is white")
        several = sum(n for f, n in self.frames.items() if f > 1)
        if several:
            said.append(f"{several} file(s) hold several frames: the middle one read (--frames first|all to change)")
        if self.unreadable:
            said.append(f"{len(self.unreadable)} file(s) cannot be opened: extraction stops at them unless --skip-bad")
        return said


def inspect_images(source: DatasetSource, limit: int | None = None) -> Inventory:
    """Open the header of every image of every split (or `limit` of them, evenly spaced) without decoding pixels."""
    refs = [ref for split in source.splits.values() for ref in split.images]
    if limit is not None and len(refs) > limit:
        refs = [refs[round(i * (len(refs) - 1) / max(limit - 1, 1))] for i in range(limit)]
    inventory = Inventory()
    for ref in refs:
        inventory.files += 1
        try:
            _inspect(ref, inventory)
        except Exception as err:  # noqa: BLE001 - any failure to open is what this command reports
            inventory.unreadable.append(f"{ref}: {type(err).__name__}")
    return inventory


def _inspect(ref: Any, inventory: Inventory) -> None:
    ref = ref.path if isinstance(ref, Frame) else ref  # a frame of a file (`--frames all`): its file's header
    if isinstance(ref, str | os.PathLike) and is_dicom(Path(ref)):
        import pydicom

        header = pydicom.dcmread(ref, stop_before_pixels=True)
        inventory.formats["DICOM"] += 1
        inventory.dicom[str(header.get("PhotometricInterpretation", "?"))] += 1
        inventory.bits[int(header.get("BitsStored", header.get("BitsAllocated", 0)) or 0)] += 1
        inventory.frames[int(header.get("NumberOfFrames", 1) or 1)] += 1
        return
    with Image.open(ref) as image:
        inventory.formats[image.format or "?"] += 1
        inventory.modes[image.mode] += 1
        inventory.bits[BITS.get(image.mode, 32 if image.mode in WIDE_MODES else 8)] += 1
        inventory.orientations[image.getexif().get(EXIF_ORIENTATION)] += 1
        inventory.alpha += int("A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info)
        inventory.frames[getattr(image, "n_frames", 1)] += 1
