"""`extract`: run an extraction, list the backbone and dataset registries. Parsing only; work is in runner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from common.cli import dataset_options, parse_overrides, run_cli
from common.errors import MedfmError
from common.runtime import output_root, torchrun_launch
from extract.corruptions import parse_corruptions
from extract.names import check_backbone, check_dataset, check_frames, check_root, check_text_tower

if TYPE_CHECKING:
    from extract.backbones.base import BackboneSpec

app = typer.Typer(help="Extract frozen-backbone features into an HDF5 cache.", no_args_is_help=True, add_completion=False)
console = Console()


def parse_layers(text: str) -> list[int] | None:
    """`-1,-4` -> [-1, -4]; `all` -> None (every block)."""
    if text == "all":
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedfmError(f"--layers must be comma-separated block indices such as -1,-4, or 'all'; got '{text}'") from None


def parse_batch_size(text: str) -> int | str:
    """`auto` or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise MedfmError(f"--batch-size must be auto or a positive integer, got '{text}'")
    return value


def parse_views(views: int | None) -> int:
    """`--views K` asks for K >= 1 augmented views; leaving it out stores the eval view only."""
    if views is not None and views < 1:
        raise MedfmError(f"--views must be at least 1, got {views}; leave it out to store the eval view only")
    return views or 0


# The options of an extraction's settings: `extract run` takes them, and `extract zeroshot` finds a cache by them.
Root = Annotated[Path | None, typer.Option(help="Folder holding the dataset's released layout.", show_default="none (demo needs none)")]
Out = Annotated[Path | None, typer.Option(help="Cache folder.", show_default="$MEDFM_OUTPUT/features")]
Tokens = Annotated[bool, typer.Option("--tokens/--no-tokens", help="Also store patch tokens (for DeiT heads).")]
TokenDtype = Annotated[str, typer.Option(help="float16 | float32 | int8 (one float32 scale per token: about half of float16's bytes).")]
Layers = Annotated[str, typer.Option(help="Blocks to store, e.g. -1,-4 or all; the last is always stored.")]
ImageSize = Annotated[int | None, typer.Option(help="Input size.", show_default="the backbone's, 224")]
InChans = Annotated[int, typer.Option(help="3 (grayscale replicated to RGB) | 1 (first conv from the R-channel kernel, the study's).")]
Norm = Annotated[str, typer.Option(help="model (the backbone's mean/std) | dataset (computed from the train split) | study (the study's "
                                        "fixed per-dataset constants).")]
Interpolation = Annotated[str, typer.Option(help="Resize mode: model (the backbone's, mostly bicubic) | bilinear (the study's) | bicubic.")]
Device = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
Precision = Annotated[str, typer.Option(help="auto (bf16 on CUDA where the GPU has it, else fp16; fp32 on the CPU) | fp32 | bf16 | fp16.")]
Views = Annotated[int | None, typer.Option(help="Augmented views of the train split stored beside its eval view, each a seeded draw of "
                                                "--augment; a probe then trains epoch e on view (e-1) mod K (the study's frozen protocol).",
                                           show_default="none: the eval view only")]
Augment = Annotated[str, typer.Option(help="The augmentation of the views: none | study (the study's train transform).")]
AugmentSeed = Annotated[int, typer.Option(help="Seed of the views' draws (finetune draws epoch v from its --seed alike).")]
Protocol = Annotated[str, typer.Option(help="medfm | study: the official code's backbone rules where they differ from ours "
                                            "(docs/protocol.md §7); study needs the study's inputs (--norm study --interpolation bilinear).")]
SplitSeed = Annotated[int | None, typer.Option(help="Seed of the split for datasets without fixed splits.",
                                               show_default="the dataset's own (see `extract datasets`)")]
Opt = Annotated[list[str] | None, typer.Option(help="Dataset option KEY=VALUE (repeatable).", show_default="none")]
Frames = Annotated[str, typer.Option(help="Which frames of multi-frame files (DICOM volumes and cine loops, multi-page TIFF) are "
                                           "samples: middle | first | all (one sample per frame, id <file id>#frame=<k>, in its "
                                           "file's split).")]
Manifest = Annotated[Path | None, typer.Option(help="Reproduce a saved split (<cache>.splits.json).", show_default="the dataset's own split")]
ImageCache = Annotated[str, typer.Option(help="auto: read the images from a matching image cache (`extract images`) under "
                                              "$MEDFM_OUTPUT/images when one is complete | off: decode the files | DIR: image caches there.")]


def extract_config(*, layers: str, views: int | None, opt: list[str] | None, split_seed: int | None, frames: str, out: Path | None,
                   **settings):
    """The `ExtractConfig` of the options above (torch loads with it: call it inside a command)."""
    from extract.runner import ExtractConfig

    return ExtractConfig(layers=parse_layers(layers), views=parse_views(views), dataset_options=dataset_options(opt, split_seed, frames),
                         out=out or output_root() / "features", **settings)


@app.command()
def run(
    backbone: Annotated[str, typer.Option(help="Backbone name (see `extract backbones`).")],
    dataset: Annotated[str, typer.Option(help="Dataset name (see `extract datasets`).")],
    root: Root = None,
    weights: Annotated[str, typer.Option(help="default | random | random:K (another draw of random weights: a null backbone, "
                                              "`grid run --null`) | auto (default, else random, loudly) | PATH.")] = "default",
    out: Out = None,
    batch_size: Annotated[str, typer.Option(help="Images per forward pass, or auto (the largest that fits on CUDA, up to 256; 16 on the CPU).")] = "auto",
    tokens: Tokens = True,
    token_dtype: TokenDtype = "float16",
    layers: Layers = "-1",
    image_size: ImageSize = None,
    in_chans: InChans = 3,
    norm: Norm = "model",
    interpolation: Interpolation = "model",
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Annotated[int | None, typer.Option(help="DataLoader workers.", show_default="cores - 1, at most 12, with a GPU; on the CPU none up to 4 cores, else a quarter")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the backbone (slower start, faster long runs).", show_default="off")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images and record them in the cache.")] = False,
    image_cache: ImageCache = "auto",
    pixels_on_device: Annotated[bool, typer.Option("--pixels-on-device", help="Hold the image cache's pixels in the device's memory "
                                                                              "and cut the eval and augmented views there, Pillow's "
                                                                              "arithmetic bit for bit: many --views at the model's speed "
                                                                              "(docs/images.md §5). Needs `extract images` first.",
                                                   show_default="off: loader workers cut them")] = False,
    views: Views = None,
    augment: Augment = "none",
    augment_seed: AugmentSeed = 0,
    protocol: Protocol = "medfm",
    split_seed: SplitSeed = None,
    opt: Opt = None,
    frames: Frames = "middle",
    manifest: Manifest = None,
    corrupt: Annotated[str | None, typer.Option(help="Also extract the test split under these corruptions, each into its own cache "
                                                     "beside the clean one: KIND:SEVERITY[,...], severity 1-5 (0 or `none`: the clean "
                                                     "view), `all:S` every kind (docs/robustness.md §1).",
                                                show_default="none: the clean cache only")] = None,
    corrupt_seed: Annotated[int, typer.Option(help="Seed of the corruptions' draws; image i's comes from it and its id alone.")] = 0,
    override: Annotated[list[str] | None, typer.Option(
        help="Backbone constructor KEY=VALUE (repeatable); for tiny test models, e.g. embed_dim=32.", hidden=True)] = None,
) -> None:
    """Extract features of every split of DATASET with BACKBONE; reuses or resumes a matching cache."""
    check_backbone(backbone)  # a typo is one line before torch and the models load
    check_dataset(dataset)
    check_root(dataset, root)
    check_frames(frames)
    corruptions = parse_corruptions(corrupt, corrupt_seed) if corrupt is not None else ()
    from extract.datasets import get_dataset  # the layout's mistakes (a CSV path outside its folder, ...) before torch loads

    source = get_dataset(dataset, root, **dataset_options(opt, split_seed, frames))
    from extract.runner import extract  # torch and the models: imported for a run, not for --help

    cfg = extract_config(
        backbone=backbone, dataset=dataset, root=root, weights=weights, out=out, batch_size=parse_batch_size(batch_size), tokens=tokens,
        token_dtype=token_dtype, layers=layers, image_size=image_size, in_chans=in_chans, norm=norm, interpolation=interpolation,
        device=device, precision=precision, workers=workers, compile=compile, skip_bad=skip_bad, image_cache=image_cache, manifest=manifest,
        views=views, augment=augment, augment_seed=augment_seed, protocol=protocol, opt=opt, split_seed=split_seed, frames=frames,
        corrupt=corruptions, pixels_on_device=pixels_on_device,
        overrides=parse_overrides(override or []),
    )
    result = extract(cfg, source=source)
    if torchrun_launch().is_main:  # under torchrun, rank 0 speaks for the joined caches
        for written in (result, *result.corrupted):
            rows = ", ".join(f"{k} {v}" for k, v in written.rows.items())
            rate = f", {written.images_per_s:.1f} img/s" if written.images_per_s else ""
            console.print(f"{'reused' if written.reused else 'wrote'} {written.path} ({rows}{rate})")


@app.command()
def zeroshot(
    backbone: Annotated[str | None, typer.Option(help="Backbone with a text tower: openclip (with --dataset and `extract run`'s options, "
                                                      "to find its cache).", show_default="none, use --cache")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (see `extract datasets`).", show_default="none, use --cache")] = None,
    cache: Annotated[Path | None, typer.Option(help="The cache file, instead of --backbone/--dataset and the options.", show_default="none")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt templates (and class words) JSON, as extract/prompts.json.",
                                                 show_default="extract/prompts.json")] = None,
    root: Root = None,
    weights: Annotated[str | None, typer.Option(help="The weights the cache was extracted with: default | random | PATH.",
                                                show_default="the cache's")] = None,
    out: Out = None,
    tokens: Tokens = True,
    token_dtype: TokenDtype = "float16",
    layers: Layers = "-1",
    image_size: ImageSize = None,
    in_chans: InChans = 3,
    norm: Norm = "model",
    interpolation: Interpolation = "model",
    device: Device = "auto",
    precision: Precision = "auto",
    views: Views = None,
    augment: Augment = "none",
    augment_seed: AugmentSeed = 0,
    protocol: Protocol = "medfm",
    split_seed: SplitSeed = None,
    opt: Opt = None,
    frames: Frames = "middle",
    manifest: Manifest = None,
    image_cache: ImageCache = "auto",
) -> None:
    """Embed each class's prompts with the backbone's own text tower into its cache, for `probe run --head zeroshot`."""
    if cache is None and (backbone is None or dataset is None):
        raise MedfmError("give --cache FILE, or --backbone and --dataset (with `extract run`'s options) to find the cache")
    if backbone is not None:
        check_text_tower(backbone)  # dinov2 & co: one line before torch loads
    if dataset is not None:
        check_dataset(dataset)
    from extract.text import ZeroShotConfig
    from extract.text import zeroshot as embed_classes

    if cache is None:
        from extract.runner import existing_cache

        cache = existing_cache(extract_config(
            backbone=backbone, dataset=dataset, root=root, weights=weights or "default", out=out, tokens=tokens, token_dtype=token_dtype,
            layers=layers, image_size=image_size, in_chans=in_chans, norm=norm, interpolation=interpolation, device=device,
            precision=precision, manifest=manifest, views=views, augment=augment, augment_seed=augment_seed, protocol=protocol,
            opt=opt, split_seed=split_seed, frames=frames, image_cache=image_cache,
        ))
    result = embed_classes(ZeroShotConfig(cache, prompts, weights, device))
    console.print(f"wrote text/classes {tuple(result.classes.shape)} into {result.path}")


@app.command()
def images(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `extract datasets`).")],
    root: Root = None,
    out: Annotated[Path | None, typer.Option(help="Image cache folder.", show_default="$MEDFM_OUTPUT/images")] = None,
    resize: Annotated[int, typer.Option(help="Side of the square resize every transform starts with (the study's 256 before its "
                                              "224 px crop; a backbone's input size / 0.875).")] = 256,
    interpolation: Annotated[str, typer.Option(help="Resize mode: bilinear (the study's) | bicubic (most backbones' own).")] = "bilinear",
    in_chans: Annotated[int | None, typer.Option(help="1 (grayscale) | 3 (RGB): as `extract run --in-chans` will feed the model.",
                                                 show_default="1 for grayscale datasets (ddsm, chexpert), else 3")] = None,
    jpeg_draft: Annotated[bool, typer.Option("--jpeg-draft", help="Decode JPEGs at a reduced scale (Pillow's draft mode): faster, not "
                                                                  "exact, so features from it get their own caches (docs/images.md §4).",
                                             show_default="off")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable images and record them in the image cache.")] = False,
    workers: Annotated[int | None, typer.Option(help="Decoding processes.", show_default="cores - 1, at most 12")] = None,
    split_seed: SplitSeed = None,
    opt: Opt = None,
    frames: Frames = "middle",
    manifest: Manifest = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Decode every image afresh, replacing the image cache of these settings "
                                                            "(needed once its source files changed).", show_default="off")] = False,
    hash_sources: Annotated[bool, typer.Option("--hash-sources", help="Also record each source file's sha256: a file whose "
                                                                      "modification time alone changed (a copy, a touch) then "
                                                                      "still matches; costs one extra read of every file.",
                                               show_default="off: size and modification time")] = False,
) -> None:
    """Decode and resize every image of DATASET once into an image cache, which `extract run` and `finetune run` then read."""
    check_dataset(dataset)
    check_root(dataset, root)
    check_frames(frames)
    from extract.image_cache import ImageCacheConfig, build_image_cache  # torch: imported for a run, not for --help

    cfg = ImageCacheConfig(dataset=dataset, root=root, out=out or output_root() / "images", resize=resize, interpolation=interpolation,
                           in_chans=in_chans, jpeg_draft=jpeg_draft, skip_bad=skip_bad, workers=workers, manifest=manifest,
                           dataset_options=dataset_options(opt, split_seed, frames), rebuild=rebuild, hash_sources=hash_sources)
    result = build_image_cache(cfg)
    rows = ", ".join(f"{k} {v}" for k, v in result.rows.items())
    rate = f", {result.images_per_s:.1f} img/s" if result.images_per_s else ""
    console.print(f"{'reused' if result.reused else 'wrote'} {result.path} ({rows}{rate})")


BACKBONE_COLUMNS = 45  # `extract backbones`: name and description, then params, pooled, tokens: 80 columns in all


@app.command()
def backbones() -> None:
    """List the backbone registry by set (study, 2025, medical: `grid run --backbones SET`), each row with its
    parameters, features and default weights file."""
    from common.study import BACKBONE_SETS
    from extract.backbones import list_backbones

    rows = {spec.name: spec for spec in list_backbones()}
    groups = {f"{word} (grid run --backbones {word})": [rows.pop(n) for n in names if n in rows] for word, names in BACKBONE_SETS.items()}
    if rows:  # entries registered at run time (a plugin, a test)
        groups["other"] = list(rows.values())
    for title, specs in groups.items():
        console.print(f"[bold]{title:<{BACKBONE_COLUMNS}}[/]{'params':>8}{'pooled':>8}  tokens @224", highlight=False)
        for spec in specs:
            for line in _backbone_lines(spec, console.width):
                console.print(line, highlight=False, markup=False, soft_wrap=True)


def _backbone_lines(spec: BackboneSpec, width: int) -> list[str]:
    """One registry row as `extract backbones` shows it: its numbers, then its weights file and whether it is found,
    the hub folder on a line of its own where the whole path would pass `width`."""
    from extract.backbones.weights import find_default_weights

    params = f"{spec.count_params() / 1e6:.2f}M" if spec.count_params else "?"
    head = f"  {spec.name:<10} {spec.study_row[:BACKBONE_COLUMNS - 14]}"
    lines = [f"{head:<{BACKBONE_COLUMNS}}{params:>8}{spec.pooled_dim:>8}  {spec.token_shape[0]} x {spec.token_shape[1]}"]
    found = f": {'found' if find_default_weights(spec) else 'missing'}"
    folder, _, file = spec.weights_file.rpartition("/")
    indent = " " * 13
    if folder and len(indent + spec.weights_file + found) > width:
        return [*lines, f"{indent}{folder}/", f"{indent}  {file}{found}"]
    return [*lines, f"{indent}{spec.weights_file}{found}"]


@app.command("check-backbone")
def check_backbone_command(
    backbone: Annotated[str, typer.Argument(help="A backbone named by its library: timm:NAME[.TAG], open_clip:ARCH[@PRETRAINED] or "
                                                 "hf:MODEL_ID_OR_FOLDER.", show_default=False)],
    weights: Annotated[str, typer.Option(help="default (the hub cache or $MEDFM_WEIGHTS_DIR) | random | PATH.")] = "default",
    image_size: ImageSize = None,
    device: Device = "auto",
    batch: Annotated[int, typer.Option(help="Images in the random batch both sides see.")] = 2,
    tolerance: Annotated[float, typer.Option(help="The bound: max |medfm - reference| <= tolerance x (1 + max |reference|).")] = 1e-4,
    override: Annotated[list[str] | None, typer.Option(
        help="Constructor KEY=VALUE (repeatable), as `extract run --override`; readout=cls|mean and prefix_tokens=N are medfm's.",
        hidden=True)] = None,
) -> None:
    """Compare medfm's features of BACKBONE with its library's own forward, and write a receipt with the weights' sha256."""
    check_backbone(backbone)  # a typo is one line, with the nearest names, before torch loads
    from extract.backbones.check import check_backbone as run_check

    report = run_check(backbone, weights, image_size=image_size, overrides=parse_overrides(override or []), device=device, batch=batch,
                       tolerance=tolerance, say=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    console.print(f"reference: {report.reference}" if report.reference else "reference: not reached", highlight=False, markup=False,
                  soft_wrap=True)
    console.print(f"receipt: {report.receipt}", highlight=False, markup=False, soft_wrap=True)
    if report.failures:
        more = f" (and {len(report.failures) - 1} more: see {report.receipt})" if len(report.failures) > 1 else ""
        raise MedfmError(f"check failed for {backbone}: {report.failures[0]}{more}")
    console.print(f"[green]passed[/]: {backbone} equals its library's own forward", highlight=False)


@app.command()
def preview(
    dataset: Annotated[str, typer.Option(help="Dataset name (see `extract datasets`).")],
    root: Root = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone whose eval transform to show (built with random weights: only its "
                                                      "input settings matter).", show_default="none: the default input policy")] = None,
    per_class: Annotated[int, typer.Option(help="Images per class (one row per class).")] = 4,
    out: Annotated[Path | None, typer.Option(help="The PNG to write.", show_default="$MEDFM_OUTPUT/previews/<dataset>[-<backbone>].png")] = None,
    split_seed: SplitSeed = None,
    opt: Opt = None,
) -> None:
    """A PNG montage of DATASET's images per class as the backbone sees them: decoded, resized, cropped, de-normalised."""
    check_dataset(dataset)
    check_root(dataset, root)
    if backbone is not None:
        check_backbone(backbone)
    from cache.layout import backbone_folder
    from extract.preview import preview as montage  # torch and matplotlib: imported for a preview, not for --help

    name = f"{dataset}-{backbone_folder(backbone)}" if backbone else dataset
    shown = montage(dataset, root, out or output_root() / "previews" / f"{name}.png", backbone=backbone, per_class=per_class,
                    dataset_options=dataset_options(opt, split_seed))
    console.print(f"wrote {shown.path} ({len(shown.classes)} classes x {shown.per_class} images, {shown.spec.size} px)",
                  highlight=False, markup=False, soft_wrap=True)


@app.command()
def datasets(
    inspect: Annotated[bool, typer.Option("--inspect", help="Count image modes, bit depths, EXIF orientations, alpha and DICOM kinds "
                                                            "in --dataset's files under --root (headers only), and say which decoding rules touch them.",
                                          show_default="off: list the registry")] = False,
    dataset: Annotated[str | None, typer.Option(help="With --inspect: the dataset to look at.", show_default="none")] = None,
    root: Root = None,
    opt: Opt = None,
    limit: Annotated[int | None, typer.Option(help="With --inspect: look at this many files, evenly spaced.", show_default="every file")] = None,
) -> None:
    """List the dataset registry and the layout each expects under --root; with --inspect, what a dataset's files hold."""
    if inspect:
        _inspect(dataset, root, opt, limit)
        return
    from extract.datasets import list_datasets
    from extract.datasets.label_maps import maps_of

    for entry in list_datasets():  # one block each: layouts are too long for table cells
        console.print(f"[bold]{entry.name}[/]  {entry.description}", highlight=False)
        for field in ("task", "split", "layout"):
            if getattr(entry, field):
                console.print(f"  {field:7s}{getattr(entry, field)}", highlight=False, markup=False, soft_wrap=True)
        for label_map in maps_of(entry.name):  # each checked against both datasets' classes (docs/transfer.md §3)
            console.print(f"  {'map':7s}{label_map.summary()}", highlight=False, markup=False, soft_wrap=True)


def _inspect(dataset: str | None, root: Path | None, opt: list[str] | None, limit: int | None) -> None:
    if dataset is None:
        raise MedfmError("--inspect needs --dataset (and --root for a dataset on disk)")
    check_dataset(dataset)
    if limit is not None and limit < 1:
        raise MedfmError(f"--limit must be at least 1, got {limit}")
    from extract.datasets import get_dataset
    from extract.datasets.inventory import inspect_images

    found = inspect_images(get_dataset(dataset, root, **dataset_options(opt, None)), limit)
    console.print(f"[bold]{dataset}[/]: {found.files} file(s) inspected", highlight=False)
    for name, counts in (("format", found.formats), ("mode", found.modes), ("bits", found.bits), ("EXIF orientation", found.orientations),
                         ("frames", found.frames), ("DICOM", found.dicom)):
        if counts:
            shown = ", ".join(f"{'none' if k is None else k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            console.print(f"  {name:17s}{shown}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"  {'alpha':17s}{found.alpha}", highlight=False)
    for line in found.effects() or ["every file is plain 8-bit without rotation or transparency: decoded as it is"]:
        console.print(f"  - {line}", highlight=False, markup=False, soft_wrap=True)
    for bad in found.unreadable[:5]:
        console.print(f"  cannot open {bad}", highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    run_cli(app, "extract", interrupted="interrupted; the partial cache (.h5.partial) keeps every row written so far, "
                                        "and the same `extract run` resumes from there")
