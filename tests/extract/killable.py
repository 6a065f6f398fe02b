"""A demo dataset that pauses at one image and signals it, so a test can act while the extraction is mid-way
(SIGKILL it, or start a second one): `MEDFM_TEST_PAUSE_AT=INDEX:MARKER[:RELEASE]` writes MARKER when image INDEX
is reached, then waits until the file RELEASE exists (at most 600 s). `INDEX#N` pauses at the Nth load of that image
in the process only (a finetune loads each train image once per epoch: `#2` pauses in the second epoch).

Registered as `killable-demo`; its images and splits are those of `demo`, so its features are too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from extract.datasets import DatasetEntry, demo, register

PAUSE_ENV = "MEDFM_TEST_PAUSE_AT"  # "INDEX[#N]:MARKER_FILE[:RELEASE_FILE]"
_loads: dict[int, int] = {}  # image index -> times this process loaded it


@dataclass(frozen=True)
class PausingImages(demo.DemoImages):
    def __call__(self, ref: tuple[int, int, int]):
        spec = os.environ.get(PAUSE_ENV)
        if spec:
            index, marker, *release = spec.split(":")
            image, _, nth = index.partition("#")
            _loads[ref[1]] = _loads.get(ref[1], 0) + 1
            if ref[1] == int(image) and (not nth or _loads[ref[1]] == int(nth)):
                Path(marker).write_text("paused")
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and not (release and Path(release[0]).exists()):
                    time.sleep(0.05)
        return super().__call__(ref)


def build(root=None, **options):
    return replace(demo.build(root, **options), name="killable-demo", load_image=PausingImages())


if "killable-demo" not in {e.name for e in __import__("extract.datasets", fromlist=["list_datasets"]).list_datasets()}:
    register(DatasetEntry("killable-demo", "demo that pauses for kill tests", "multiclass", "nothing", build))
