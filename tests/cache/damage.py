"""Damage written into a cache file on purpose, at a row's raw bytes: what the checked reads must catch."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np


def scribble(path: Path, split: str, array: str, row: int, size: int = 4096, seed: int = 0) -> None:
    """Write `size` random bytes (at most one row's) over the start of row `row` of `split/array`, in place in the file,
    at the row's raw offset: the chunk that holds it (`get_chunk_info_by_coord`), or the contiguous data's offset."""
    with h5py.File(path, "r") as f:
        ds = f[f"{split}/{array}"]
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
        if ds.chunks is None:
            at = ds.id.get_offset() + row * row_bytes
        else:
            first = row - row % ds.chunks[0]
            at = ds.id.get_chunk_info_by_coord((first, *[0] * (ds.ndim - 1))).byte_offset + (row - first) * row_bytes
    fd = os.open(path, os.O_WRONLY)
    try:
        old = os.pread(os.open(path, os.O_RDONLY), min(size, row_bytes), at)
        new = np.random.default_rng(seed).integers(0, 256, len(old), dtype=np.uint8).tobytes()
        os.pwrite(fd, new if new != old else bytes(b ^ 0xFF for b in old), at)
    finally:
        os.close(fd)
