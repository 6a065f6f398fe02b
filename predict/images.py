"""The unlabelled images to predict: every image file under a folder, or the `path` column of a CSV.

They become a one-split `DatasetSource`, so they are decoded by extract's own `ImageDataset` exactly as a dataset's
images are (extract/datasets/decode.py), with no labels behind them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache.schema import Task
from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Split, read_table
from extract.datasets.folder import IMAGE_SUFFIXES, list_images, text_id

SPLIT = "predict"  # the one split of the images' source
PATH_COLUMN = "path"


def unlabelled(images: Path, task: Task) -> DatasetSource:
    """The images under folder `images` (ids: their paths under it), or listed in the CSV `images` (ids: the paths as written,
    relative to the CSV's folder unless absolute); `task` names the classes the run predicts."""
    images = Path(images).expanduser()
    if images.is_dir():
        paths = list_images(images)
        if not paths:
            raise MedfmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {images}")
        ids = [text_id(p.relative_to(images)) for p in paths]
    elif images.is_file():
        table = read_table(images, [PATH_COLUMN], dtype={PATH_COLUMN: str})
        ids = table[PATH_COLUMN].dropna().tolist()
        if not ids:
            raise MedfmError(f"{images} lists no images in its '{PATH_COLUMN}' column")
        paths = [images.parent / p for p in ids]
    else:
        raise MedfmError(f"--images {images} does not exist; pass a folder of images or a CSV with a '{PATH_COLUMN}' column")
    return DatasetSource("images", task, {SPLIT: Split(ids, np.zeros(len(ids), dtype=np.int64), paths)})
