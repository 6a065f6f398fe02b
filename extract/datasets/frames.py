"""`--frames middle|first|all`: which frames of multi-frame files (DICOM volumes and cine loops, enhanced CT/MR
objects, multi-page TIFF) a dataset's samples are.

`middle` (the default) and `first` keep one sample per file and tell the decoder which frame to read; `all` makes one
sample per frame, its id `<file id>#frame=<k>`, its label and metadata those of its file. The split is made per file
before the frames are expanded, so every frame of a file lands in the file's split.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from extract.datasets.base import DatasetSource, Split
from extract.datasets.decode import Frame, frame_count, open_image
from extract.names import check_frames

DEFAULT_FRAMES = "middle"


def with_frames(source: DatasetSource, frames: str) -> DatasetSource:
    """`source` reading `frames` of its multi-frame files; unchanged for the default or a source that decodes no files."""
    check_frames(frames)
    if frames == DEFAULT_FRAMES or source.load_image is not open_image:
        return source
    options = {**source.options, "frames": frames}  # fingerprinted: other frames, other features
    if frames == "first":
        return replace(source, load_image=partial(open_image, frames="first"), options=options)
    return replace(source, splits={name: expand(split) for name, split in source.splits.items()}, options=options)


def expand(split: Split) -> Split:
    """One sample per frame of each multi-frame file of `split` (headers read, pixels not), in the file's place."""
    counts = [frame_count(ref) if isinstance(ref, str | Path) else 1 for ref in split.images]
    if all(c == 1 for c in counts):
        return split
    ids, images = [], []
    for image_id, ref, count in zip(split.ids, split.images, counts, strict=True):
        ids += [image_id] if count == 1 else [f"{image_id}#frame={k}" for k in range(count)]
        images += [ref] if count == 1 else [Frame(Path(ref), k) for k in range(count)]
    repeat = np.asarray(counts)
    metadata = {column: [v for v, c in zip(values, counts, strict=True) for _ in range(c)] for column, values in split.metadata.items()}
    return Split(ids, np.repeat(split.labels, repeat, axis=0), images, metadata)
