"""The torch side of a dataset: decoding and transforming one split's images for a DataLoader.

Apart from the registry (`extract.datasets`) so that listing datasets and checking a layout need no torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from common.errors import MedfmError
from extract.datasets.base import DatasetSource
from extract.datasets.decode import to_mode


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms one split's images; a bad image comes back flagged, never as a crash."""

    def __init__(self, source: DatasetSource, split: str, transform: Callable[[Image.Image], torch.Tensor], shape: tuple[int, int, int]) -> None:
        self.refs = source.splits[split].images
        self.ids = source.splits[split].ids
        self.seeds: list[int] | None = None  # per-image seeds of the random transform (`draw`); None: torch's stream
        self.load_image = source.load_image
        self.mode = "L" if shape[0] == 1 else "RGB"
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.refs)

    def draw(self, seeds: list[int] | None) -> None:
        """Transform image i under torch seeded with `seeds[i]` (its draw of a random augmentation), or None: unseeded."""
        self.seeds = seeds

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        ref = self.refs[index]
        try:
            image = to_mode(self.load_image(ref), self.mode)  # bit depth, palette, alpha: extract/datasets/decode.py
            if self.seeds is None:
                return self.transform(image), True, ""
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                torch.manual_seed(self.seeds[index])
                return self.transform(image), True, ""
        except FileNotFoundError:
            return torch.zeros(self.shape), False, f"{ref}: file not found"
        except MedfmError as err:  # a refusal that says why; the readers name the file, a conversion may not
            return torch.zeros(self.shape), False, str(err) if str(err).startswith(str(ref)) else f"{ref}: {err}"
        except Exception as err:  # noqa: BLE001 - any decode failure is reported by the runner, with the file
            return torch.zeros(self.shape), False, f"{ref}: {type(err).__name__}: {err}"
