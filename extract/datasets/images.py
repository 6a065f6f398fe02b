"""The torch side of a dataset: decoding and transforming one split's images for a DataLoader.

Apart from the registry (`extract.datasets`) so that listing datasets and checking a layout need no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from extract.datasets.base import DatasetSource


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms one split's images; a bad image comes back flagged, never as a crash."""

    def __init__(self, source: DatasetSource, split: str, transform: Callable[[Image.Image], torch.Tensor], shape: tuple[int, int, int]) -> None:
        self.refs = source.splits[split].images
        self.load_image = source.load_image
        self.mode = "L" if shape[0] == 1 else "RGB"
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        try:
            image = self.load_image(self.refs[index]).convert(self.mode)
            return self.transform(image), True, ""
        except FileNotFoundError:
            return torch.zeros(self.shape), False, f"{self.refs[index]}: file not found"
        except Exception as err:  # noqa: BLE001 - any decode failure is reported by the runner, with the file
            return torch.zeros(self.shape), False, f"{self.refs[index]}: {type(err).__name__}: {err}"
