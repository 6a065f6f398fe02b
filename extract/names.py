"""The names in the backbone and dataset registries, known without building or importing anything heavy.

The command lines check `--backbone` and `--dataset` against these before torch is imported, so a typo
(`extract run --backbone sam3`) is one line in a fraction of a second. `tests/extract/test_cli.py` checks that
they equal the registries (`extract.backbones`, `extract.datasets`); a new entry goes in both.

A backbone may also be named by its library, with no entry of its own (`extract/backbones/by_name.py`):
`timm:NAME[.TAG]`, `open_clip:ARCH[@PRETRAINED]` or `hf:MODEL_ID_OR_FOLDER`. Those names are checked here too, still
without torch: timm's architectures are read from the `@register_model` functions of its source files and open_clip's
from its model-config files (both equal `timm.list_models()` and `open_clip.list_models()`, which would import torch
and take seconds); once the library is imported, its own listing is used. A pretrained tag is checked when torch loads.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from common.errors import MedfmError
from common.registry import unknown
from common.study import MEDICAL_BACKBONES, MODERN_BACKBONES

BACKBONES = ("deit", "dino", "dinov2", "resnet152", "blip", "openclip", "sam", "seem", *MODERN_BACKBONES, *MEDICAL_BACKBONES)
TEXT_TOWERS = ("openclip",)  # backbones with a text tower of their own: `extract zeroshot`
DATASETS = ("aptos2019", "chexpert", "ddsm", "cbis-ddsm", "demo", "imagefolder", "csv", "ham10000", "idrid", "isic2019",
            "medmnist", "messidor2", "chestxray14")


def check_backbone(name: str) -> None:
    """An unknown backbone is the registry's own error (`extract.backbones.get_spec`), said without loading it;
    a library name (`timm:`, `open_clip:`, `hf:`) is checked against the library's models (`check_library_name`)."""
    if ":" in name:
        check_library_name(name)
        return
    names = _loaded("extract.backbones", "list_backbones") or BACKBONES
    if name not in names:
        raise unknown("backbone", name, names, "extract backbones")


def check_text_tower(name: str) -> None:
    """A backbone without a text tower cannot embed class prompts (`extract zeroshot`): one line."""
    check_backbone(name)
    if name not in TEXT_TOWERS:
        raise MedfmError(f"{name} has no text tower: zero-shot needs a CLIP backbone ({', '.join(TEXT_TOWERS)})")


ROOTLESS = ("demo",)  # generated in memory; every other dataset reads --root


def check_root(dataset: str, root: Path | None) -> None:
    """A missing or wrong --root is one line before torch loads (the dataset module says the same, later, in detail).
    Only the registry's own datasets are known to need one; a dataset registered at run time decides for itself."""
    if root is None and dataset in DATASETS and dataset not in ROOTLESS:
        raise MedfmError(f"dataset '{dataset}' needs --root PATH (`extract datasets` shows the layout it expects there)")
    if root is not None and not Path(root).expanduser().exists():
        raise MedfmError(f"--root {root} does not exist; dataset '{dataset}' reads its files from there")


def check_dataset(name: str) -> None:
    """An unknown dataset is the registry's own error (`extract.datasets.get_dataset`), said without loading it."""
    names = _loaded("extract.datasets", "list_datasets") or DATASETS
    if name not in names:
        raise unknown("dataset", name, names, "extract datasets")


def _loaded(module: str, listing: str) -> tuple[str, ...]:
    """The names of a registry already imported in this process (entries registered at run time included), else ()."""
    registry = sys.modules.get(module)
    return tuple(entry.name for entry in getattr(registry, listing)()) if registry is not None else ()


# --- backbones named by their library ------------------------------------------------------------------------------

LIBRARIES = {  # prefix -> the form of a name
    "timm": "timm:NAME[.TAG]",
    "open_clip": "open_clip:ARCH[@PRETRAINED]",
    "hf": "hf:MODEL_ID_OR_FOLDER",
}


@dataclass(frozen=True)
class LibraryName:
    """A backbone named by its library: `timm:vit_small_patch16_224.augreg_in1k` is ("timm", "vit_small_patch16_224",
    "augreg_in1k"); `open_clip:ViT-B-16@laion2b_s34b_b88k` is ("open_clip", "ViT-B-16", "laion2b_s34b_b88k");
    `hf:facebook/dinov2-small` is ("hf", "facebook/dinov2-small", None)."""

    library: str
    model: str
    tag: str | None = None

    @property
    def name(self) -> str:
        sep = {"timm": ".", "open_clip": "@"}.get(self.library, "")
        return f"{self.library}:{self.model}" + (f"{sep}{self.tag}" if self.tag else "")


def parse_library_name(name: str) -> LibraryName | None:
    """The library name in `name`, or None for a registry name (no `:`); a malformed one is one line."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None
    if prefix not in LIBRARIES:
        near = difflib.get_close_matches(prefix, LIBRARIES, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]}:?)" if near else ""
        raise MedfmError(f"unknown backbone library '{prefix}' in '{name}'{hint}; name a backbone as "
                         f"{', '.join(LIBRARIES.values())}, or one of: {', '.join(BACKBONES)}")
    if not rest.strip():
        raise MedfmError(f"'{name}' names no model; write {LIBRARIES[prefix]}")
    if prefix == "timm":
        model, _, tag = rest.partition(".")
    elif prefix == "open_clip":
        model, _, tag = rest.partition("@")
    else:
        model, tag = rest, ""
    if not model or (prefix != "hf" and tag == "" and rest.endswith((".", "@"))):
        raise MedfmError(f"'{name}' is not a backbone name; write {LIBRARIES[prefix]}")
    return LibraryName(prefix, model, tag or None)


def check_library_name(name: str) -> LibraryName:
    """A library name whose model exists, or one line naming the nearest models (exit 2 from a command line)."""
    parsed = parse_library_name(name)
    assert parsed is not None
    if parsed.library == "hf":
        hf_folder(parsed.model)
        return parsed
    models = timm_models() if parsed.library == "timm" else open_clip_models()
    if parsed.model not in models:
        raise MedfmError(f"unknown {parsed.library} model '{parsed.model}'" + nearest(parsed.model, models))
    return parsed


def nearest(word: str, choices: list[str] | tuple[str, ...], n: int = 5) -> str:
    """`; nearest: a, b, c` (difflib over the choices), or `; no model has a similar name` when none is close."""
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if not close:  # a long name far from every model: try the names that share its first word
        stem = re.split(r"[_\-.]", word)[0].lower()
        close = [c for c in choices if c.lower().startswith(stem)][:n] if stem else []
    return f"; nearest: {', '.join(close)}" if close else "; no model has a similar name"


def timm_models() -> tuple[str, ...]:
    """timm's architectures: `timm.list_models()` once timm is imported, else read from its source without importing it."""
    timm = sys.modules.get("timm")
    return tuple(timm.list_models()) if timm is not None else _timm_source_models()


def open_clip_models() -> tuple[str, ...]:
    """open_clip's architectures: `open_clip.list_models()` once imported (configs added at run time included), else
    the model configs in its package folder, read as open_clip reads them."""
    open_clip = sys.modules.get("open_clip")
    return tuple(open_clip.list_models()) if open_clip is not None else _open_clip_config_models()


@lru_cache(maxsize=1)
def _timm_source_models() -> tuple[str, ...]:
    """The names of the `@register_model` functions in timm/models/*.py: timm.list_models(), without torch (50 ms)."""
    root = _package_folder("timm") / "models"
    pattern = re.compile(r"^@register_model\s*\ndef\s+(\w+)\s*\(", re.M)
    return tuple(sorted({m for path in root.glob("*.py") for m in pattern.findall(path.read_text(encoding="utf-8"))}))


@lru_cache(maxsize=1)
def _open_clip_config_models() -> tuple[str, ...]:
    """The model configs open_clip registers on import (open_clip/model_configs/*.json with the three keys it needs)."""
    names = []
    for path in sorted((_package_folder("open_clip") / "model_configs").glob("*.json")):
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
            names.append(path.stem)
    return tuple(names)


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise MedfmError(f"{package} is not installed; `pip install {package}` to name its models")
    return Path(next(iter(spec.submodule_search_locations)))


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_folder(model: str) -> Path:
    """The folder of `hf:MODEL`: a local folder holding config.json, or the model's snapshot in the Hugging Face cache
    (never downloaded); else one line saying what to do."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise MedfmError(f"hf:{model}: the folder {folder} has no config.json; save the model there with "
                             "save_pretrained, or name a model of the Hugging Face cache")
        return folder
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise MedfmError(f"hf:{model}: no folder {model}; pass a folder saved with save_pretrained, or a model id")
    from huggingface_hub import try_to_load_from_cache  # no torch

    hit = try_to_load_from_cache(model, "config.json")
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit).parent
    raise MedfmError(f"hf:{model} is neither a folder nor a model in the Hugging Face cache; download it first "
                     f"(`hf download {model}`, where there is internet) or pass a folder saved with save_pretrained")


FRAMES = ("middle", "first", "all")  # which frames of multi-frame files are samples (`--frames`, extract/datasets/frames.py)


def check_frames(frames: str) -> str:
    if frames not in FRAMES:
        raise MedfmError(f"--frames must be one of {', '.join(FRAMES)}, got '{frames}'")
    return frames
