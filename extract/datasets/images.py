"""The torch side of a dataset: decoding and transforming one split's images for a DataLoader.

Apart from the registry (`extract.datasets`) so that listing datasets and checking a layout need no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from rich.console import Console

from cache.store import DamagedCache
from common.errors import MedfmError
from common.runtime import one_torch_thread
from extract.datasets.base import DatasetSource
from extract.datasets.decode import to_mode

DAMAGED = "damaged cache: "  # marks, in a loader's per-image error, a stored row that failed its checksum


class Pixels(Protocol):
    """Decoded images stored ahead of time (`extract.image_cache.CachedPixels`): where each id sits, and its image."""

    def locate(self, ids: list[str]) -> list[tuple[str, int, bool] | None]: ...

    def image(self, split: str, row: int) -> Image.Image: ...

    def unreadable(self) -> MedfmError: ...


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and transforms one split's images; a bad image comes back flagged, never as a crash.

    With `pixels` (an image cache whose images are the transform's first step, its resize, applied to these files:
    `extract.image_cache.find_image_cache`), an image it holds is read from there instead of decoded; the resize then
    finds it at its size and leaves it as it is, so the tensors are the same.

    Decoded in the model's own process (in-line, `--workers 0`), uint8 crops run no torch operation, so the model's
    threads are left as they are, with no switch to one thread and back around each image or batch. A float transform
    normalises with torch, so it runs on one torch thread: on a shared machine the threads' fork and join would cost
    more than the work (`common.runtime.one_torch_thread`).
    """

    def __init__(self, source: DatasetSource, split: str, transform: Callable[[Image.Image], torch.Tensor], shape: tuple[int, int, int],
                 pixels: Pixels | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.refs = source.splits[split].images
        self.ids = source.splits[split].ids
        self.seeds: list[int] | None = None  # per-image seeds of the random transform (`draw`); None: torch's stream
        self.load_image = source.load_image
        self.mode = "L" if shape[0] == 1 else "RGB"
        self.transform = transform
        self.shape = shape
        self.dtype = dtype  # the transform's output type (of the zeros standing in for an unreadable image, too)
        self.pixels = pixels
        self.stored = pixels.locate(self.ids) if pixels is not None else None  # (split, row, readable) per image, or None

    def __len__(self) -> int:
        return len(self.refs)

    def draw(self, seeds: list[int] | None) -> None:
        """Transform image i under torch seeded with `seeds[i]` (its draw of a random augmentation), or None: unseeded."""
        self.seeds = seeds

    def load(self, index: int) -> Image.Image:
        """Image `index` in the model's mode: from the image cache when it holds it, else decoded from its file."""
        where = self.stored[index] if self.stored is not None else None
        if where is None:
            return to_mode(self.load_image(self.refs[index]), self.mode)  # bit depth, palette, alpha: extract/datasets/decode.py
        split, row, readable = where
        if not readable:
            raise self.pixels.unreadable()
        return to_mode(self.pixels.image(split, row), self.mode)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, str]:
        if self.dtype == torch.uint8:  # crops (`extract.transforms.eval_crop`, `train_crop`): PIL and NumPy, no torch operation
            return self._item(index)
        with one_torch_thread():  # a float transform normalises with torch: on one thread, wherever it runs
            return self._item(index)

    def _item(self, index: int) -> tuple[torch.Tensor, bool, str]:
        ref = self.refs[index]
        try:
            image = self.load(index)
            if self.seeds is None:
                return self.transform(image), True, ""
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                torch.manual_seed(self.seeds[index])
                return self.transform(image), True, ""
        except FileNotFoundError:
            return torch.zeros(self.shape, dtype=self.dtype), False, f"{ref}: file not found"
        except DamagedCache as err:  # a damaged image cache is no unreadable image: never skipped (`SkippedImages.check`)
            return torch.zeros(self.shape, dtype=self.dtype), False, DAMAGED + f"image {ref}: {err}"
        except MedfmError as err:  # a refusal that says why; the readers name the file, a conversion may not
            return torch.zeros(self.shape, dtype=self.dtype), False, str(err) if str(err).startswith(str(ref)) else f"{ref}: {err}"
        except Exception as err:  # noqa: BLE001 - any decode failure is reported by the runner, with the file
            return torch.zeros(self.shape, dtype=self.dtype), False, f"{ref}: {type(err).__name__}: {err}"


class SkippedImages:
    """Unreadable images of a run: stop at the first (one line naming it), or with `--skip-bad` skip them, each said
    per batch, every one kept with its reason, and at the end the total and a file listing them all (`finish`).

    Extraction and the image-cache build share this rule."""

    def __init__(self, skip_bad: bool, console: Console) -> None:
        self.skip_bad, self.console = skip_bad, console
        self.found: list[tuple[str, str]] = []  # (id, reason)

    @property
    def ids(self) -> list[str]:
        return [image_id for image_id, _ in self.found]

    def check(self, ok: torch.Tensor, errors: list[str], ids: list[str]) -> None:
        """A batch's images (rows of `ids`, in order): raise for an unreadable one, or record and say it."""
        if bool(ok.all()):
            return
        bad = [(i, e) for i, e, good in zip(ids, errors, ok.tolist(), strict=True) if not good]
        damaged = [e for _, e in bad if e.startswith(DAMAGED)]
        if damaged:  # the stored pixels, not the image, are bad: stop whatever --skip-bad says
            raise MedfmError(damaged[0].removeprefix(DAMAGED))
        if not self.skip_bad:
            raise MedfmError(f"cannot read image {bad[0][1]}; fix or remove it, or pass --skip-bad to skip unreadable images")
        self.found.extend(bad)
        self.console.print(f"[yellow]skipped {len(bad)} unreadable image(s)[/]: {bad[0][1]}"
                           + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""), highlight=False, soft_wrap=True)

    def finish(self, beside: Path) -> Path | None:
        """Say the total and write every skipped image with its reason to `<beside>.skipped.tsv`; None if none was."""
        if not self.found:
            return None
        path = beside.with_name(beside.name.split(".")[0] + ".skipped.tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("id\treason\n" + "".join(f"{i}\t{' '.join(str(e).split())}\n" for i, e in self.found))
        self.console.print(f"[yellow]skipped {len(self.found)} unreadable image(s) in all[/]; each with its reason in {path}",
                           highlight=False, soft_wrap=True)
        return path
