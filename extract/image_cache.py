"""The image cache ("decode once"): every image of a dataset decoded and resized once, kept as uint8 pixels.

Every eval and train transform starts with a square resize (the study's: 256 x 256, bilinear); what follows
(centre crop, RandomResizedCrop, flips, jitter, normalisation) only sees the resized image. `extract images`
stores that image once per (dataset, root, options, split manifest, resize, interpolation, channels, decoder
version, JPEG draft); extraction, its augmented views and finetune then read it in place of the file.
torchvision's `Resize` returns an image already at its size unchanged, so the tensors are the originals' bit for
bit and the feature caches keep their fingerprints (docs/images.md §4).

The file is a cache of `cache/store.py` (same locking, resume, disk reservation and per-row CRC-32; `cache verify`
checks it) whose one array per split is `pixels [N, C, H, W]` uint8, as torchvision's `PILToTensor` gives it, with
the split's ids and labels; its meta names no backbone (`pixels`). Image caches live under `$MEDFM_OUTPUT/images`.

The fingerprint names the files, not their bytes, so the file also records each source file's size and modification
time, taken before it is decoded (`cache.store.SourceFiles`; with `--hash-sources` also its sha256). Every reader
(`find_image_cache`: extraction, finetune) and a rerun of `extract images` compare them with the files, one `stat` a
file, and refuse a cache whose files changed, naming one and the command that rebuilds it (`--rebuild`). An image
cache built before they were recorded still reads, unchecked, and says so once.
"""

from __future__ import annotations

import inspect
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision import transforms as T

from cache.fingerprint import fingerprint, manifest_hash
from cache.schema import BackboneInfo, CacheMeta, DatasetInfo
from cache.store import CacheReader, CacheWriter, FeatureSpec, SourceFiles, SplitPlan, partial_path, planned_bytes
from common.errors import MedfmError
from common.runtime import check_folder, check_workers, loader_workers, output_root
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource
from extract.datasets.decode import DECODER_VERSION, open_image, to_8bit
from extract.datasets.images import ImageDataset, SkippedImages
from extract.datasets.registry import REGISTRY
from extract.datasets.splits import read_manifest
from extract.transforms import TransformSpec, square_resize

IMAGE_CACHE_VERSION = 1  # raised when what is stored changes: it enters every image cache's fingerprint
PIXELS = "pixels"  # the one array of each split, and the meta's backbone name (no model made these)
STUDY_RESIZE = 256  # the study's Resize((256, 256)) before its 224 px crop
RESIZE_MODES = ("bilinear", "bicubic")
DRAFT_SUFFIXES = (".jpg", ".jpeg")
BATCH = 16  # images per write: large enough to amortise the flush, small enough that a kill loses little


@dataclass(frozen=True)
class PixelSpec:
    """What an image cache holds: square images of `resize` px, resampled by `interpolation`, in 1 (L) or 3 (RGB) channels."""

    resize: int
    interpolation: str  # a torchvision interpolation mode's name
    channels: int
    jpeg_draft: bool = False  # JPEGs decoded at a reduced scale (Pillow's draft mode) before the resize: not exact

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resize, self.resize)


def pixel_spec(resize: int, interpolation: str, channels: int, jpeg_draft: bool = False) -> PixelSpec:
    """The spec with its interpolation named as the transforms resolve it (`model` names such as `bicubic` pass through)."""
    return PixelSpec(resize, square_resize(resize, interpolation).interpolation.value, channels, jpeg_draft)


def pixel_settings(source: DatasetSource, root: Path | None, spec: PixelSpec) -> dict[str, Any]:
    """Everything that changes the stored pixels; its hash is the image cache's fingerprint."""
    return {
        "kind": PIXELS,
        "version": IMAGE_CACHE_VERSION,
        "decoder": DECODER_VERSION,  # how files became pixels (extract/datasets/decode.py)
        "dataset": source.name,
        "root": str(Path(root).expanduser().resolve()) if root else None,
        "dataset_options": source.options,
        "manifest_hash": manifest_hash(source.manifest()),
        "resize": spec.resize,
        "interpolation": spec.interpolation,
        "channels": spec.channels,
        "jpeg_draft": spec.jpeg_draft,
    }


def cache_file(folder: Path, dataset: str, fp: str) -> Path:
    return Path(folder) / f"{dataset}-{fp[:12]}.h5"


def image_folder(option: str) -> Path | None:
    """`--image-cache`: auto ($MEDFM_OUTPUT/images), off (None: decode the files) or a folder of image caches."""
    if option == "off":
        return None
    if option == "auto":
        return output_root() / "images"
    folder = Path(option).expanduser()
    if not folder.is_dir():
        raise MedfmError(f"--image-cache {option} is neither auto, off nor a folder; pass auto, off, or the --out of `extract images`")
    return folder


@dataclass(frozen=True)
class JpegDraft:
    """A dataset's image loader, except that JPEG files are decoded by Pillow's draft mode: the DCT scaled down by
    1/2, 1/4 or 1/8 while both sides stay at least `size`, then the rules of `extract/datasets/decode.py`."""

    load_image: Any
    size: int

    def __call__(self, ref: Any) -> Image.Image:
        if self.load_image is open_image and isinstance(ref, str | os.PathLike) and Path(ref).suffix.lower() in DRAFT_SUFFIXES:
            with Image.open(ref) as image:
                if image.format == "JPEG":
                    image.draft(image.mode, (self.size, self.size))
                    image.load()
                    return to_8bit(ImageOps.exif_transpose(image))
        return self.load_image(ref)


def source_paths(source: DatasetSource, root: Path | None) -> list[str | os.PathLike]:
    """The files an image cache of `source` is decoded from: every image reference that is a path. A dataset whose images
    are not files (generated ones, or arrays out of one file such as MedMNIST's .npz) gives the file `--root` names, if any."""
    paths = [ref for split in source.splits.values() for ref in split.images if isinstance(ref, str | os.PathLike)]
    if paths or root is None:
        return paths
    root = Path(root).expanduser()
    named = source.options.get("file")
    if root.is_file():
        return [root]
    return [root / named] if isinstance(named, str) and (root / named).is_file() else []


def rebuild_command(source: DatasetSource, root: Path | None, folder: Path, spec: PixelSpec, manifest: Path | None = None) -> str:
    """The `extract images` command that rebuilds the image cache of `source` with `spec` in `folder` (`--rebuild`),
    with the `--manifest` that re-split `source`, if one did."""
    words = ["--dataset", source.name]
    if root is not None:
        words += ["--root", str(Path(root).expanduser().resolve())]
    if Path(folder).expanduser().resolve() != (output_root() / "images").resolve():
        words += ["--out", str(folder)]
    if spec.resize != STUDY_RESIZE:
        words += ["--resize", str(spec.resize)]
    if spec.interpolation != "bilinear":
        words += ["--interpolation", spec.interpolation]
    if spec.channels != (1 if source.grayscale else 3):
        words += ["--in-chans", str(spec.channels)]
    if spec.jpeg_draft:
        words.append("--jpeg-draft")
    try:
        takes = inspect.signature(REGISTRY.get(source.name).build).parameters
    except (MedfmError, TypeError, ValueError):
        takes = {}
    for key, value in source.options.items():  # the dataset options its builder takes (others are derived, e.g. a file name)
        if key in takes and isinstance(value, str | int | float | bool):
            words += ["--opt", f"{key}={value}"]
    if manifest is not None:
        words += ["--manifest", str(manifest)]
    return " ".join(["extract images", *map(shlex.quote, words), "--rebuild"])


_UNRECORDED: set[Path] = set()  # image caches this process said it cannot check (built before sources were recorded)


def check_sources(reader: CacheReader, rebuild: str, console: Console | None = None) -> None:
    """Refuse, in one line naming a changed file and `rebuild`, an image cache whose source files changed since it was
    built (one `stat` a file); an image cache without a record (built before medfm kept one) passes, said once."""
    sources = reader.sources()
    if sources is None:
        if reader.path not in _UNRECORDED:
            _UNRECORDED.add(reader.path)
            (console or Console(stderr=True)).print(
                f"[yellow]image cache {reader.path.name} was built before medfm recorded its source files[/]: whether they "
                f"changed is not checked (`{rebuild}` records them)", highlight=False, soft_wrap=True)
        return
    changed = sources.changed()
    if changed:
        (path, why), more = changed[0], len(changed) - 1
        raise MedfmError(f"image cache {reader.path} is stale: {path} changed since it was built ({why})"
                         + (f" and {more} more file(s) did" if more else "") + f"; rebuild it with `{rebuild}`")


class CachedPixels:
    """A complete image cache, read image by image. Each process (each DataLoader worker) opens the file on its own
    first read, so no HDF5 handle crosses a fork; reads are raw-chunk copies from a memory map (`CacheReader.read_rows`),
    each row checked against its CRC-32. Opening it checks that the source files did not change (`check_sources`)."""

    def __init__(self, path: Path, spec: PixelSpec, rebuild: str = "extract images ... --rebuild",
                 console: Console | None = None) -> None:
        self.path, self.spec = Path(path), spec
        self._rows: dict[str, tuple[str, int, bool]] | None = {}
        with CacheReader(self.path) as reader:
            check_sources(reader, rebuild, console)
            for split in reader.splits:
                ids, valid = reader.row_ids(split), reader.valid(split)
                self._rows.update((i, (split, row, bool(ok))) for row, (i, ok) in enumerate(zip(ids, valid, strict=True)))
        self._reader: CacheReader | None = None
        self._pid = 0

    def locate(self, ids: list[str]) -> list[tuple[str, int, bool] | None]:
        """(split, row, readable) of each id in the cache, None for an id it does not hold (then the file is decoded)."""
        if self._rows is None:
            raise RuntimeError("CachedPixels.locate is called where the dataset is built, not in a loader worker")
        return [self._rows.get(i) for i in ids]

    def image(self, split: str, row: int) -> Image.Image:
        """The stored image of `row` of `split`, an L or RGB PIL image of the cache's size."""
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = CacheReader(self.path), os.getpid()
        pixels = self._reader.read_rows(split, PIXELS, row, row + 1)[0]
        return Image.fromarray(pixels[0] if self.spec.channels == 1 else pixels.transpose(1, 2, 0))

    def unreadable(self) -> MedfmError:
        """What a row stored as unreadable (`extract images --skip-bad`) says when read."""
        return MedfmError(f"unreadable when the image cache {self.path.name} was built; fix the file, then `cache rm {self.path}` "
                          "and rerun `extract images`, or pass --skip-bad")

    def __getstate__(self) -> dict[str, Any]:
        """What a loader worker gets: the path and spec; it opens the file itself and needs no id index."""
        return {**self.__dict__, "_rows": None, "_reader": None, "_pid": 0}


def find_image_cache(source: DatasetSource, root: Path | None, tspec: TransformSpec, option: str, *,
                     draft: bool = True, console: Console | None = None, manifest: Path | None = None) -> CachedPixels | None:
    """The complete image cache whose images are `tspec`'s resize of `source`'s files, or None (`option` off, or none built).

    An exact one first; else, when `draft`, one built with `--jpeg-draft` (whose use changes the features). One whose
    source files changed since it was built is refused (`check_sources`), never passed over for the files. `manifest`:
    the saved split that re-split `source`, named in the command that rebuilds the cache.
    """
    folder = image_folder(option)
    if folder is None:
        return None
    for jpeg_draft in (False, True) if draft else (False,):
        spec = pixel_spec(tspec.resize, tspec.interpolation, tspec.channels, jpeg_draft)
        path = cache_file(folder, source.name, fingerprint(pixel_settings(source, root, spec)))
        if path.exists():
            return CachedPixels(path, spec, rebuild_command(source, root, folder, spec, manifest), console)
    return None


@dataclass
class ImageCacheConfig:
    dataset: str
    root: Path | None = None
    out: Path = field(default_factory=lambda: output_root() / "images")
    resize: int = STUDY_RESIZE
    interpolation: str = "bilinear"  # the study's; a backbone's own resize is bicubic for most (`extract backbones`)
    in_chans: int | None = None  # None: the dataset's, 1 for grayscale datasets (ddsm, chexpert), else 3
    jpeg_draft: bool = False
    skip_bad: bool = False
    workers: int | None = None
    manifest: Path | None = None  # a saved <cache>.splits.json: the split `extract run --manifest` will use
    dataset_options: dict[str, Any] = field(default_factory=dict)
    rebuild: bool = False  # decode afresh, replacing a complete (or partial) image cache of these settings
    hash_sources: bool = False  # also record each source file's sha256 (a file whose time alone changed then passes)


@dataclass
class ImageCacheResult:
    path: Path
    reused: bool
    rows: dict[str, int]
    decoded: int  # images decoded by this call (a resumed build: only the rows still missing)
    images_per_s: float | None


def build_image_cache(cfg: ImageCacheConfig, console: Console | None = None) -> ImageCacheResult:
    """Decode and resize every image of `cfg.dataset` once into an image cache; reuse a complete one, resume a partial one."""
    console = console or Console(stderr=True)
    if cfg.resize < 16:
        raise MedfmError(f"--resize must be at least 16 px, got {cfg.resize}")
    if cfg.interpolation not in RESIZE_MODES:
        raise MedfmError(f"--interpolation must be one of {', '.join(RESIZE_MODES)}, got {cfg.interpolation}")
    if cfg.in_chans not in (None, 1, 3):
        raise MedfmError(f"--in-chans must be 1 (grayscale) or 3, got {cfg.in_chans}")
    check_workers(cfg.workers)
    check_folder(cfg.out, "--out", writable=False)  # a complete image cache on a read-only disk is still reused
    source = get_dataset(cfg.dataset, cfg.root, **cfg.dataset_options)
    if cfg.manifest is not None:
        source = source.with_manifest(read_manifest(cfg.manifest))
    channels = cfg.in_chans or (1 if source.grayscale else 3)
    spec = pixel_spec(cfg.resize, cfg.interpolation, channels, cfg.jpeg_draft)
    settings = pixel_settings(source, cfg.root, spec)
    fp = fingerprint(settings)
    path = cache_file(cfg.out, source.name, fp)
    if path.exists() and not cfg.rebuild:
        with CacheReader(path) as reader:
            if reader.fingerprint != fp:
                raise MedfmError(f"{path} holds a different fingerprint than its name says; remove it with `cache rm {path}`")
            check_sources(reader, rebuild_command(source, cfg.root, cfg.out, spec, cfg.manifest), console)
            rows = {s: len(reader.ids(s)) for s in reader.splits}
        console.print(f"[green]reusing image cache[/] {path} (complete; nothing to decode)")
        return ImageCacheResult(path, True, rows, 0, None)

    meta = CacheMeta(
        backbone=BackboneInfo(PIXELS), dataset=DatasetInfo(source.name, source.options, settings["manifest_hash"]), task=source.task,
        layers=(0,), num_layers=1, settings=settings, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        transform={"resize": spec.resize, "interpolation": spec.interpolation, "channels": spec.channels},
    )
    plan = {name: SplitPlan(split.ids, split.labels, {PIXELS: FeatureSpec(spec.shape, "uint8")}) for name, split in source.splits.items()}
    files = source_paths(source, cfg.root)
    if cfg.hash_sources:
        console.print(f"hashing {len(files)} source file(s) (--hash-sources)")
    sources = SourceFiles.record(files, hashed=cfg.hash_sources)  # before decoding: a file changed later is seen as changed
    resuming = partial_path(path).exists() and not cfg.rebuild
    writer = CacheWriter.open(path, meta, plan, sources=sources, replace=cfg.rebuild)
    if resuming and not writer.resumed:
        console.print(f"not resuming {partial_path(path).name}: its record of the source files differs (they changed since it "
                      "was started, it was started with another --hash-sources or before medfm kept one); decoding afresh")
    if resuming and writer.resumed and any(writer.rows(s) for s in plan):
        console.print(f"resuming {partial_path(path).name}: " + ", ".join(f"{s} {writer.rows(s)}/{writer.planned(s)}" for s in plan))
    else:
        console.print(f"decoding {source.name} once at {spec.resize} x {spec.resize} ({spec.interpolation}"
                      f"{', JPEG draft' if spec.jpeg_draft else ''}) -> {path} ({planned_bytes(plan) / 2**30:.2f} GiB)")
    started = time.perf_counter()
    try:
        with writer.costed("cpu"):  # an interrupted build's seconds count too, when it resumes
            skipped = SkippedImages(cfg.skip_bad, console)
            decoded = _decode_splits(source, spec, writer, cfg, console, skipped)
            if skipped.found:
                writer.add_skipped(skipped.ids)
                skipped.finish(path)
        seconds = time.perf_counter() - started
        writer.finalize()
    finally:
        writer.close()
    console.print(f"[green]image cache complete[/] {path}")
    return ImageCacheResult(path, False, {s: len(split) for s, split in source.splits.items()}, decoded,
                            decoded / seconds if decoded and seconds > 0 else None)


def _decode_splits(source: DatasetSource, spec: PixelSpec, writer: CacheWriter, cfg: ImageCacheConfig,
                   console: Console, skipped: SkippedImages) -> int:
    """Decode, resize and write every split's missing rows, a batch at a time (the `rows` mark is the resume point)."""
    if spec.jpeg_draft:
        source = replace(source, load_image=JpegDraft(source.load_image, spec.resize))
    to_pixels = T.Compose([square_resize(spec.resize, spec.interpolation), T.PILToTensor()])
    segments = [(name, writer.rows(name), len(split)) for name, split in source.splits.items() if writer.rows(name) < len(split)]
    decoded = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    with progress:
        bar = progress.add_task(f"images / {source.name}", total=sum(stop - start for _, start, stop in segments))
        for name, start, stop in segments:
            images = ImageDataset(source, name, to_pixels, spec.shape, dtype=torch.uint8)
            workers = min(loader_workers(cfg.workers), -(-(stop - start) // BATCH))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(start, stop)), batch_size=BATCH,
                                                 num_workers=workers, prefetch_factor=4 if workers else None)
            row = start
            for pixels, ok, errors in loader:
                skipped.check(ok, errors, images.ids[row : row + len(ok)])
                writer.write(name, row, {PIXELS: pixels.numpy()}, ok.numpy())
                row += len(pixels)
                decoded += len(pixels)
                progress.update(bar, advance=len(pixels))
    return decoded
