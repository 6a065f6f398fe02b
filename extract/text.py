"""Zero-shot class embeddings from a CLIP backbone's own text tower (`extract zeroshot`).

A class's embedding is the mean over the prompt templates of the L2-normalised `encode_text(tokenizer(prompt))`,
normalised again (CLIP's prompt ensembling). The text tower is open_clip's ViT-B-16 CLIP, built whole from the same
vision settings as the cache's image tower (its image size and constructor overrides), seeded as `create_backbone`
seeds random weights, and loaded from the same checkpoint; its `visual` is checked tensor by tensor against the image
tower the cache was extracted with. The embeddings go into the cache's `text` group (`cache.store.write_text_classes`).

Prompts: `extract/prompts.json`, or `--prompts FILE` of the same shape: `templates` (dataset -> list of strings with
one `{}`, `default` for the others) and optionally `classnames` (dataset -> {class name: words}).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cache.store import CacheReader, write_text_classes
from common.errors import MedfmError
from common.runtime import resolve_device
from extract.backbones.openclip import MODEL
from extract.backbones.registry import RANDOM_INIT_SEED, create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, load_state_dict, load_strict, resolve_weights
from extract.names import check_text_tower

PROMPTS_FILE = Path(__file__).with_name("prompts.json")


def load_prompts(path: Path | None = None) -> dict[str, Any]:
    """The prompt file (`extract/prompts.json` unless `path`), checked: templates per dataset, each with one `{}`."""
    path = Path(path) if path is not None else PROMPTS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MedfmError(f"cannot read --prompts {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise MedfmError(f"--prompts {path} is not a text file (not UTF-8); give a JSON file shaped as extract/prompts.json") from None
    except json.JSONDecodeError as err:
        raise MedfmError(f"--prompts {path} is not JSON ({err}); give a JSON file shaped as extract/prompts.json") from None
    templates = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(templates, dict) or not templates:
        raise MedfmError(f"--prompts {path} needs a 'templates' object: dataset (or default) -> list of templates with one {{}}")
    for name, items in templates.items():
        if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.count("{}") == 1 for t in items):
            raise MedfmError(f"--prompts {path}: templates of {name} must be a non-empty list of strings, each with one {{}}")
    words = data.get("classnames", {})
    if not isinstance(words, dict) or not all(isinstance(v, dict) for v in words.values()):
        raise MedfmError(f"--prompts {path}: 'classnames' must map a dataset to {{class name: words}}")
    return data


def prompts_for(prompts: dict[str, Any], dataset: str, class_names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(templates, words per class) for `dataset`: its own templates or the default ones, class names mapped to words."""
    templates = prompts["templates"].get(dataset) or prompts["templates"].get("default")
    if not templates:
        raise MedfmError(f"the prompts have no templates for {dataset} and no default ones")
    mapping = prompts.get("classnames", {}).get(dataset, {})
    return list(templates), [str(mapping.get(name, name)) for name in class_names]


def build_clip(weights: Path | None, image_size: int = 224, text_overrides: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """open_clip's whole ViT-B-16 CLIP: `overrides` replace vision-config fields (and embed_dim) as for the image tower,
    `text_overrides` text-config fields. Random weights are seeded as `create_backbone` seeds them; the image tower is
    built first from the same settings, so its weights equal those of the `openclip` backbone."""
    import open_clip
    from open_clip.model import resize_pos_embed

    cfg = open_clip.get_model_config(MODEL)
    overrides = dict(overrides)
    embed_dim = overrides.pop("embed_dim", cfg["embed_dim"])
    vision_cfg = {**cfg["vision_cfg"], **overrides, "image_size": image_size}
    text_cfg = {**cfg["text_cfg"], **(text_overrides or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = open_clip.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=cfg.get("quick_gelu", False))
    if weights is not None:
        state_dict = load_state_dict(weights)
        if not any(k.startswith("visual.") for k in state_dict) or "token_embedding.weight" not in state_dict:
            raise MedfmError(f"weights file {weights} holds no whole CLIP (image and text towers); zero-shot needs the full "
                             "open_clip checkpoint")
        resize_pos_embed(state_dict, model)
        load_strict(model, state_dict, weights, f"open_clip {MODEL}")
    return model.eval()


@torch.no_grad()
def class_embeddings(model: nn.Module, templates: list[str], words: list[str], device: torch.device | str = "cpu") -> np.ndarray:
    """[C, D] float32: per class, the mean of the L2-normalised text embeddings of its prompts, re-normalised."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(MODEL, context_length=model.context_length)
    model = model.to(device)
    rows = []
    for word in words:
        tokens = tokenizer([t.format(word) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    return torch.stack(rows).cpu().numpy().astype(np.float32)


def _cache_weights(identity: dict[str, Any], weights: str | None, backbone: str) -> ResolvedWeights:
    """The weights the cache was extracted with, found again: random, the official file, or `--weights PATH` with the same sha256."""
    spec = get_spec(backbone)
    kind = identity.get("kind")
    if kind == "random" and weights in (None, "random"):
        return ResolvedWeights("random", None, None, seed=int(identity.get("seed", 0)))
    if kind == "random":
        raise MedfmError("this cache holds features of random weights; leave --weights out")
    resolved = resolve_weights(spec, weights or ("default" if kind == "pretrained" else str(identity.get("file"))))
    if resolved.sha256 != identity.get("sha256"):
        raise MedfmError(f"the cache was extracted with {identity.get('file')} (sha256 {str(identity.get('sha256'))[:12]}), not "
                         f"{resolved.path}; pass that file with --weights PATH")
    return resolved


@dataclass
class ZeroShotConfig:
    cache: Path
    prompts: Path | None = None
    weights: str | None = None  # where the cache's weights file is, when it is not the official one found by default
    device: str = "auto"
    text_overrides: dict[str, Any] = field(default_factory=dict)  # text-config fields (tests: a tiny text tower)


@dataclass
class ZeroShotResult:
    path: Path
    classes: np.ndarray
    templates: list[str]
    words: list[str]


def zeroshot(cfg: ZeroShotConfig) -> ZeroShotResult:
    """Embed the cache's class prompts with its backbone's text tower and store them in its `text` group."""
    with CacheReader(cfg.cache) as reader:
        meta = reader.meta
    backbone = meta.backbone.name
    check_text_tower(backbone)
    if meta.task.kind == "multilabel":
        raise MedfmError(f"{meta.dataset.name} is a multilabel task; zero-shot here scores single-label tasks")
    settings = meta.settings
    templates, words = prompts_for(load_prompts(cfg.prompts), meta.dataset.name, meta.task.class_names)
    weights = _cache_weights(settings.get("weights") or meta.backbone.weights or {}, cfg.weights, backbone)
    size, overrides, protocol = int(settings["transform"]["size"]), dict(settings.get("overrides") or {}), settings.get("protocol", "medfm")
    clip = build_clip(weights.path, size, cfg.text_overrides, **overrides)
    image = create_backbone(backbone, weights, image_size=size, protocol=protocol, **overrides).model.state_dict()
    visual = clip.visual.state_dict()
    if visual.keys() != image.keys() or any(not torch.equal(visual[k], image[k]) for k in image):
        raise MedfmError(f"the CLIP built for the text tower has another image tower than {cfg.cache.name} was extracted with")
    device = resolve_device(cfg.device)
    classes = class_embeddings(clip, templates, words, device)
    model = {"model": MODEL, "weights": weights.identity, "text_overrides": cfg.text_overrides}
    write_text_classes(cfg.cache, classes, templates, words, model)
    return ZeroShotResult(Path(cfg.cache), classes, templates, words)
