"""Views cut on the device (`extract run --pixels-on-device`, docs/images.md §5): the image cache's pixels of the images
to extract are held there as one uint8 tensor, and each batch's eval or augmented views are made there, so many
augmented views run at the model's speed rather than at the loader workers' (crop, resize and jitter of PIL images).

The tensors are Pillow's, bit for bit (tests/extract/test_device_views.py, on the CPU):

- the eval view is the centre crop, a slice;
- augmented view v of image i draws its parameters exactly as the PIL path (`extract.transforms.train_crop`) does,
  under `view_seed(seed, v, id)` and in torchvision's order (`draw_view`), then repeats Pillow's integer arithmetic on
  tensors: RandomResizedCrop's bilinear resample as two matrix products with Pillow's fixed-point coefficients (exact in
  float64, whatever the summation order), the flips, and ColorJitter's steps in their drawn order, each as Pillow
  computes it (`Image.blend` in float32, truncated; the contrast's rounded mean and the saturation's grey of Pillow's
  integer luma; the hue through Pillow's 8-bit HSV).

Measured against the PIL path (50 images x 4 views, 224 px, and the tests' tiny images): 0 levels of difference, max
and mean. On CUDA the same operations are IEEE float32 and float64 arithmetic without fast-math, so they give the same
numbers, which `make gpu-check` is the place to confirm; until then a cache with augmented views made this way keeps
its own fingerprint (`extract.runner.plan_cache`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from cache.store import CacheReader
from common.errors import MedfmError
from extract.datasets.base import DatasetSource
from extract.image_cache import PIXELS, CachedPixels
from extract.transforms import TransformSpec, train_crop, view_seed

FIT_FRACTION = 0.75  # of the device's free memory the pixels may take: the rest is the model's and its batches'
READ_BYTES = 256 * 2**20  # pixels read from the image cache per slice
PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit resampling (libImaging/Resample.c)
HALF, ONE = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)
LUMA = (19595.0, 38470.0, 7471.0)  # Pillow's RGB -> L: (r 19595 + g 38470 + b 7471 + 2^15) >> 16
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's step numbers, as `ColorJitter.get_params` orders them
# Pillow's hsv2rgb: for each sector i % 6, which of (v, p, q, t) becomes R, G and B
SECTORS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


@dataclass(frozen=True)
class ViewDraw:
    """One image's draw of the study's augmentation: what the PIL pipeline does to it."""

    box: tuple[int, int, int, int]  # RandomResizedCrop's (top, left, height, width) in the centre crop
    vflip: bool
    hflip: bool
    jitter: tuple[tuple[int, float], ...]  # ColorJitter's (step, factor) in the drawn order; () when RandomApply skips it


@dataclass(frozen=True)
class StudySteps:
    """The random steps of `train_crop`, taken from it, so that the two paths share their parameters."""

    crop: T.RandomResizedCrop
    vflip: T.RandomVerticalFlip
    hflip: T.RandomHorizontalFlip
    apply: T.RandomApply
    jitter: T.ColorJitter

    @classmethod
    def of(cls, spec: TransformSpec) -> StudySteps:
        """The steps of `train_crop(spec)`; a changed pipeline fails here rather than drawing other views."""
        steps = train_crop(spec).transforms
        kinds = [T.Resize, T.CenterCrop, T.RandomResizedCrop, T.RandomVerticalFlip, T.RandomHorizontalFlip, T.RandomApply]
        if ([type(s) for s in steps[:-1]] != kinds or [type(t) for t in steps[5].transforms] != [T.ColorJitter]
                or steps[2].interpolation != T.InterpolationMode.BILINEAR):
            raise RuntimeError("extract.transforms.train_crop changed: extract/device_views.py repeats its steps, change it alike")
        return cls(steps[2], steps[3], steps[4], steps[5], steps[5].transforms[0])


def draw_view(steps: StudySteps, size: int, seed: int) -> ViewDraw:
    """The parameters the PIL pipeline draws under `seed`: torch's global generator seeded as `ImageDataset` seeds it,
    then RandomResizedCrop, the vertical flip, the horizontal flip, RandomApply and ColorJitter, in that order. The
    caller's random stream is left as it was (`torch.random.fork_rng`)."""
    canvas = torch.empty((1, size, size), device="meta")  # get_params reads the size only
    jitter = steps.jitter
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed's CPU part: the draws are CPU tensors
        box = steps.crop.get_params(canvas, steps.crop.scale, steps.crop.ratio)
        vflip = bool(torch.rand(1) < steps.vflip.p)
        hflip = bool(torch.rand(1) < steps.hflip.p)
        if steps.apply.p < torch.rand(1):
            return ViewDraw(tuple(box), vflip, hflip, ())
        order, *factors = jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    steps = [int(k) for k in order]
    return ViewDraw(tuple(box), vflip, hflip, tuple((k, factors[k]) for k in steps if factors[k] is not None))


@functools.cache
def pillow_taps(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear resample of `length` pixels to `size` (`precompute_coeffs`, `normalize_coeffs_8bpc`): each
    output pixel's first input pixel [size] and fixed-point weights [size, K], computed in the same double arithmetic."""
    scale = length / size
    filterscale = max(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1
    inverse = 1.0 / filterscale
    firsts, weights = np.zeros(size, np.int64), np.zeros((size, int(np.ceil(support)) * 2 + 1), np.int64)
    for xx in range(size):
        center = (xx + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        taps = [max(0.0, 1.0 - abs((x + first - center + 0.5) * inverse)) for x in range(min(int(center + support + 0.5), length) - first)]
        total = 0.0
        for w in taps:  # in order, as C adds them (Python 3.12's sum() compensates)
            total += w
        firsts[xx] = first
        weights[xx, : len(taps)] = [int(0.5 + (w / total if total else w) * ONE) for w in taps]
    return firsts, weights


def _pass_matrices(spans: Sequence[tuple[int, int]], size: int, device: torch.device) -> torch.Tensor:
    """[n, size, size] float64: row o of image k weighs the centre crop's pixels that Pillow's pass over span k =
    (offset, length) weighs for output pixel o; zero elsewhere."""
    taps = [pillow_taps(length, size) for _, length in spans]
    k = max(w.shape[1] for _, w in taps)
    index = np.stack([offset + first for (offset, _), (first, _) in zip(spans, taps, strict=True)])[..., None] + np.arange(k)
    weights = np.stack([np.pad(w, ((0, 0), (0, k - w.shape[1]))) for _, w in taps])
    matrices = torch.zeros((len(spans), size, size), dtype=torch.float64, device=device)
    index = torch.from_numpy(np.minimum(index, size - 1)).to(device)  # padded taps (weight 0) may point past the crop
    return matrices.scatter_add_(2, index, torch.from_numpy(weights).to(device, torch.float64))


def _fixed(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's `clip8`: a fixed-point sum, rounded by its half-unit start, shifted and clipped to 0..255."""
    return sums.add_(HALF).div_(ONE).floor_().clamp_(0, 255)


def resized_crops(canvas: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: int) -> torch.Tensor:
    """Each (top, left, height, width) box of `canvas` [n, C, size, size] (float64, integer levels) resized to `size` as
    Pillow's bilinear `resize` does: a horizontal pass, then a vertical one, each rounded and clipped. A box never
    exceeds the canvas, so each pass enlarges its side or keeps it, and Pillow (13 included, which may shrink
    vertically first) runs the horizontal pass first."""
    rows = _pass_matrices([(top, height) for top, _, height, _ in boxes], size, canvas.device)[:, None]
    cols = _pass_matrices([(left, width) for _, left, _, width in boxes], size, canvas.device).transpose(1, 2)[:, None]
    return _fixed(rows @ _fixed(canvas @ cols))


def _divided(x: torch.Tensor, by: float) -> torch.Tensor:
    """`x / by` correctly rounded on any device: CUDA multiplies by the reciprocal of a Python scalar divisor, so the
    divisor goes in as a tensor there."""
    return x / torch.tensor(by, dtype=x.dtype, device=x.device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L of [n, 3, H, W] levels as [n, 1, H, W] (float32: every partial sum is below 2^24, so exact)."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2] + 32768.0).div_(65536.0).floor_().unsqueeze(1)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Pillow's `Image.blend(degenerate, image, factor)`: `in1 + factor * (in2 - in1)` in float32, clipped, truncated."""
    return (image - degenerate).mul_(factors.view(-1, 1, 1, 1)).add_(degenerate).clamp_(0, 255).floor_()


def _brightness(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return _blend(torch.zeros((), device=x.device), x, torch.tensor(factors, device=x.device))


def _contrast(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Blended with the grey of the image's mean luma, rounded as `ImageEnhance.Contrast` rounds it."""
    luma = _luma(x) if x.shape[1] == 3 else x
    mean = _divided(luma.double().sum(dim=(1, 2, 3)), luma[0].numel())
    return _blend(mean.add_(0.5).floor_().float().view(-1, 1, 1, 1), x, torch.tensor(factors, device=x.device))


def _saturation(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Blended with the image's own luma (`ImageEnhance.Color`); a grey image is left as it is, as Pillow leaves it."""
    return _blend(_luma(x), x, torch.tensor(factors, device=x.device)) if x.shape[1] == 3 else x


def _hue(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """torchvision's PIL `adjust_hue`: Pillow's 8-bit HSV, the hue byte shifted by `int(factor * 255)` modulo 256, back
    to RGB; a grey image is left as it is."""
    if x.shape[1] != 3:
        return x
    h, s, v = _pillow_hsv(x)
    shifts = torch.tensor([int(f * 255) % 256 for f in factors], dtype=torch.float64, device=x.device)
    return _pillow_rgb(torch.remainder(h + shifts.view(-1, 1, 1), 256.0), s, v)


ADJUST = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _saturation, HUE: _hue}


def _pillow_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pillow's `rgb2hsv_row` on [n, 3, H, W] levels: float32 where its C code has float, float64 where it has double."""
    r, g, b = x.unbind(1)
    top, bottom = torch.maximum(r, torch.maximum(g, b)), torch.minimum(r, torch.minimum(g, b))
    grey = top == bottom
    span = torch.where(grey, 1.0, top - bottom)
    s = (top - bottom) / torch.where(top == 0, 1.0, top)
    rc, gc, bc = (top - r) / span, (top - g) / span, (top - b) / span
    h = torch.where(r == top, bc - gc, torch.where(g == top, (rc.double() + 2.0 - bc.double()).float(),
                                                   (gc.double() + 4.0 - rc.double()).float()))
    h = torch.fmod(_divided(h.double(), 6.0) + 1.0, 1.0).float()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    uh = torch.where(grey, zero, (h.double() * 255.0).trunc_().clamp_(0, 255))
    us = torch.where(grey, zero, (s.double() * 255.0).trunc_().clamp_(0, 255))
    return uh, us, top.double()


def _pillow_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pillow's `hsv2rgb` of [n, H, W] levels to [n, 3, H, W] (float32 levels). No (h, s, v) of the 2^24 gives a product
    halfway between two integers, so torch's rounding (halves to even) is C's `round` (halves away from zero) here."""
    h6 = _divided(h * 6.0, 255.0)
    sector = h6.floor()
    f = (h6 - sector).float()
    fs = _divided(s, 255.0).float()
    p = (v * (1.0 - fs.double())).round_().clamp_(0, 255)
    q = (v * (1.0 - (fs * f).double())).round_().clamp_(0, 255)
    t = (v * (1.0 - fs.double() * (1.0 - f.double()))).round_().clamp_(0, 255)
    table = torch.tensor(SECTORS, device=h.device)[torch.remainder(sector, 6).long()].permute(0, 3, 1, 2)
    rgb = torch.stack((v, p, q, t), dim=1).gather(1, table)
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1), rgb).float()


def jittered(x: torch.Tensor, draws: Sequence[ViewDraw]) -> torch.Tensor:
    """ColorJitter on [n, C, H, W] float32 levels, each image's steps in its drawn order; the images taking the same
    step at the same place are adjusted together, each with its own factor."""
    for place in range(max((len(d.jitter) for d in draws), default=0)):
        for step, adjust in ADJUST.items():
            chosen = [k for k, d in enumerate(draws) if len(d.jitter) > place and d.jitter[place][0] == step]
            if chosen:
                index = torch.tensor(chosen, dtype=torch.long, device=x.device)
                x[index] = adjust(x[index], [draws[k].jitter[place][1] for k in chosen])
    return x


def augmented(images: torch.Tensor, draws: Sequence[ViewDraw], size: int) -> torch.Tensor:
    """The study's augmented views of uint8 `images` [n, C, R, R] (the image cache's resize), one draw each, as uint8
    [n, C, size, size]: what `train_crop` makes of the same images and draws."""
    canvas = F.center_crop(images, [size, size]).double()
    x = resized_crops(canvas, [d.box for d in draws], size)
    for dim, flips in ((-2, [d.vflip for d in draws]), (-1, [d.hflip for d in draws])):
        x = torch.where(torch.tensor(flips, device=x.device).view(-1, 1, 1, 1), x.flip(dim), x)
    return jittered(x.float(), draws).to(torch.uint8)


def held_bytes(pixels: CachedPixels, source: DatasetSource) -> int:
    """What holding the images of `source`'s splits (each image once) on the device takes."""
    images = len({i for split in source.splits.values() for i in split.ids})
    return images * int(np.prod(pixels.spec.shape))


def check_fits(nbytes: int, device: torch.device) -> None:
    """Refuse, in one line, pixels that would take more than FIT_FRACTION of the device's free memory (on the CPU, of
    the memory available)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if nbytes > FIT_FRACTION * free:
        raise MedfmError(f"--pixels-on-device: the images take {nbytes / 2**30:.2f} GiB, more than {FIT_FRACTION:.0%} of the "
                         f"{free / 2**30:.2f} GiB free on {device}; run without it (loader workers read the image cache)")


class DeviceViews:
    """The image cache's pixels of `source`'s images, one uint8 tensor on `device`, and each batch's views cut from it.

    Each image is held once, whatever groups it is in (the train split and its augmented views share it). A row stored
    as unreadable (`extract images --skip-bad`) gives what `ImageDataset` gives: zeros, flagged, with the image cache's
    reason."""

    def __init__(self, pixels: CachedPixels, source: DatasetSource, spec: TransformSpec, device: torch.device, seed: int) -> None:
        self.spec, self.seed, self.device = spec, seed, device
        self.steps = StudySteps.of(spec)
        images = list(dict.fromkeys(i for split in source.splits.values() for i in split.ids))
        slot = {image: k for k, image in enumerate(images)}
        stored = dict(zip(images, pixels.locate(images), strict=True))
        self.groups = dict(source.splits)
        self.slots = {name: torch.tensor([slot[i] for i in split.ids], dtype=torch.long, device=device)
                      for name, split in source.splits.items()}
        missing = [(ref, i) for split in source.splits.values() for ref, i in zip(split.images, split.ids, strict=True) if stored[i] is None]
        if missing:
            raise MedfmError(f"the image cache {pixels.path} does not hold image {missing[0][0]}; run without --pixels-on-device")
        self.readable = {i: where[2] for i, where in stored.items()}
        self.why = str(pixels.unreadable())
        self.pixels = self._load(pixels, [stored[i] for i in images])

    def _load(self, pixels: CachedPixels, where: list[tuple[str, int, bool]]) -> torch.Tensor:
        """Every image's stored row, gathered from the image cache (`CacheReader.take_rows`) about READ_BYTES at a time."""
        held = torch.empty((len(where), *pixels.spec.shape), dtype=torch.uint8, device=self.device)
        step = max(1, READ_BYTES // int(np.prod(pixels.spec.shape)))
        with CacheReader(pixels.path) as reader:
            for split in {s for s, _, _ in where}:
                slots = np.array([k for k, (s, _, _) in enumerate(where) if s == split])
                rows = np.array([where[k][1] for k in slots])
                order = np.argsort(rows)  # take_rows reads sorted rows
                rows, slots = rows[order], slots[order]
                for at in range(0, len(rows), step):
                    block = reader.take_rows(split, PIXELS, rows[at : at + step])
                    held[torch.from_numpy(slots[at : at + step]).to(self.device)] = torch.from_numpy(block).to(self.device)
        return held

    def batch(self, group: str, view: int | None, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Rows [start, stop) of `group` as a loader batch: uint8 crops on the device (the eval view, or augmented view
        `view`), whether each image was readable, and the reason of each that was not."""
        split = self.groups[group]
        ids, refs = split.ids[start:stop], split.images[start:stop]
        images = self.pixels[self.slots[group][start:stop]]
        if view is None:
            crops = F.center_crop(images, [self.spec.size, self.spec.size]).contiguous()
        else:
            crops = augmented(images, [draw_view(self.steps, self.spec.size, view_seed(self.seed, view, i)) for i in ids], self.spec.size)
        ok = torch.tensor([self.readable[i] for i in ids])
        if not bool(ok.all()):
            crops[~ok.to(self.device)] = 0
        return crops, ok, ["" if good else f"{ref}: {self.why}" for ref, good in zip(refs, ok.tolist(), strict=True)]
