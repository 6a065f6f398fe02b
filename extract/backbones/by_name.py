"""Backbones named by their library, with no module of their own: `timm:NAME[.TAG]`, `open_clip:ARCH[@PRETRAINED]`,
`hf:MODEL_ID_OR_FOLDER` (docs/backbones.md §9).

Each name resolves to a `BackboneSpec` when first asked for (`extract.backbones.registry.get_spec`), and builds into
the same `Backbone` interface as the study's eight (`extract/backbones/library.py` works out its pooled feature and its
rule, its patch tokens, its blocks, its input size and norm, its first convolution). Weights: `--weights PATH`, the
file in `$MEDFM_WEIGHTS_DIR` laid out as on the hub (`timm/<name.tag>/model.safetensors`), the Hugging Face cache,
an `hf:` folder itself, or `random`; a file is read by medfm's safe loader and loaded strictly. The name (with its
prefix) and the weights identity enter the cache fingerprint; an `hf:` model's config.json hash does too.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from common.errors import MedfmError
from extract.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    DataConfig,
    count_parameters,
)
from extract.backbones.library import LibraryBackbone, Outputs, find_input_conv, say_once, take_medfm_options
from extract.backbones.registry import register_library
from extract.backbones.weights import load_state_dict, load_strict, take_prefix
from extract.names import HF_WEIGHT_FILES, check_library_name, hf_folder, nearest

# --- timm -------------------------------------------------------------------------------------------------------------


def timm_blocks(model: nn.Module, prefix: str = "") -> list[str]:
    """The paths of a timm model's blocks in the order they chain: `blocks` (ViTs, EVA, EfficientNet's stages),
    `stages` (ConvNeXt and most CNNs), `layers` (Swin), or ResNet's `layer1`..`layer4`; [] when none is found."""
    for attr in ("blocks", "stages", "layers"):
        container = getattr(model, attr, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return [f"{prefix}{attr}.{i}" for i in range(len(container))]
    if all(isinstance(getattr(model, f"layer{i}", None), nn.Module) for i in (1, 2, 3, 4)):
        return [f"{prefix}layer{i}" for i in (1, 2, 3, 4)]
    return []


POOLS = {"token": "the CLS token after the final norm", "avg": "the global average of the patch tokens or feature map", "map": "an attention pool (MAP head)",
         "max": "the max over the tokens", "avgmax": "the mean of avg and max pooling", "catavgmax": "avg and max pooling, concatenated",
         "": "the final features as they are"}


def timm_pool_rule(model: nn.Module) -> str:
    pool = getattr(model, "global_pool", None)
    if pool is None:  # ConvNeXt & co. keep it in their head
        pool = getattr(getattr(model, "head", None), "global_pool", None)
    if isinstance(pool, nn.Module):
        pool = getattr(pool, "pool_type", type(pool).__name__)
    words = POOLS.get(str(pool), "the model's own pooling") if pool is not None else "the model's own pooling"
    if pool == "token" and isinstance(getattr(model, "norm", None), nn.Identity):  # RADIO & co. end without a norm
        words = "the CLS token (the model has no final norm)"
    return f"{words} (timm forward_head, global_pool={pool!r})"


def timm_patch_size(model: nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else None


def run_timm(model: nn.Module, x: torch.Tensor) -> Outputs:
    """timm's own forward, split where it hands over to the head: forward_features, then forward_head(pre_logits)."""
    final = model.forward_features(x)
    return Outputs(model.forward_head(final, pre_logits=True), final)


def timm_data_config(model: nn.Module, size: int | None) -> DataConfig:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return DataConfig(int(size or cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])


def create_timm(full: str, weights: Path | None, kwargs: dict[str, Any]) -> nn.Module:
    """timm builds the model; a file goes through timm's own checkpoint filter and loads strictly (`create_timm_model`).
    `kwargs["img_size"]` (position embeddings resampled to it) is dropped for a model that takes none (a CNN takes any
    input size as it is); `kwargs` is left as the model was built."""
    import timm

    from extract.backbones.timm_family import create_timm_model

    try:
        if weights is not None and timm.models.get_pretrained_cfg(full) is None:  # an architecture timm has no weights for
            model = timm.create_model(full, pretrained=False, num_classes=0, **kwargs)
            load_strict(model, load_state_dict(weights), weights, f"timm {full}")
            return model
        return create_timm_model(full, weights, **kwargs)
    except TypeError as err:
        if "img_size" in kwargs and "img_size" in str(err):
            del kwargs["img_size"]
            return create_timm(full, weights, kwargs)
        raise MedfmError(f"timm {full} does not take these settings ({err}); drop the --override that names it") from None


def build_timm(full: str, name: str, weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm",
               **overrides: Any) -> Backbone:
    options = take_medfm_options(overrides)
    size = image_size or overrides.pop("img_size", None)
    kwargs = dict(overrides) | ({"img_size": size} if size else {})
    model = create_timm(full, weights, kwargs)
    backbone = LibraryBackbone(
        model, name=name, data_config=timm_data_config(model, size), run=run_timm, slots=timm_blocks(model),
        first_conv=find_input_conv(model, (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")),
        patch_size=timm_patch_size(model), prefix_tokens=options.get("prefix_tokens", getattr(model, "num_prefix_tokens", None)),
        map_format=getattr(model, "output_fmt", "NCHW"), readout=options.get("readout", "model"),
        pooled_rule=timm_pool_rule(model), library_kwargs=kwargs, protocol=protocol,
    ).work_out()
    say_once(name, backbone.describe())
    return backbone


def resolve_timm(name: str) -> BackboneSpec:
    import timm

    parsed = check_library_name(name)
    full = f"{parsed.model}.{parsed.tag}" if parsed.tag else parsed.model
    if parsed.tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{parsed.model}.*")]
        if parsed.tag not in tags:
            raise MedfmError(f"timm has no pretrained tag '{parsed.tag}' for {parsed.model}" + (nearest(parsed.tag, tags) if tags else
                             "; it has no pretrained weights (pass --weights PATH or random)"))
    cfg = timm.models.get_pretrained_cfg(full)
    extra: dict[str, Any] = {"library": "timm"}
    hub = getattr(cfg, "hf_hub_id", None)
    if hub:
        weights_file, weights_url = f"{hub}/model.safetensors", f"https://huggingface.co/{hub}/resolve/main/model.safetensors"
        hub_files = tuple((hub, f) for f in dict.fromkeys((cfg.hf_hub_filename or "model.safetensors", "model.safetensors",
                                                           "pytorch_model.bin")))
    elif cfg is not None and cfg.url:
        weights_file, weights_url, hub_files = Path(urlparse(cfg.url).path).name, cfg.url, ()
    else:
        weights_file, weights_url, hub_files = f"{full}.safetensors", "", ()
        extra["missing_weights"] = f"timm has no pretrained weights for {full}; pass --weights PATH or --weights random"
    return BackboneSpec(
        name=name, study_row="", family="timm", build=partial(build_timm, full, name), weights_file=weights_file,
        weights_url=weights_url, hub_files=hub_files, pooled_dim=0, token_shape=(0, 0), count_params=partial(_count_timm, full),
        notes="timm by name: pooled = timm's own head (forward_head, pre-logits); tokens = patch tokens of forward_features",
        extra=extra,
    )


def _count_timm(full: str) -> int:
    import timm

    with torch.device("meta"):
        return count_parameters(timm.create_model(full, pretrained=False, num_classes=0))


# --- open_clip ----------------------------------------------------------------------------------------------------------

TINY_TEXT = {"layers": 1, "width": 64, "heads": 1, "vocab_size": 1000}  # the check's reference under --override: text unused
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {}  # architectures open_clip ships no config for: a hub model's own model_cfg
# (open_clip_config.json), held by the registry row that names it (BiomedCLIP, extract/backbones/named.py)


def open_clip_vision_cfg(arch: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
    """(vision config, embed_dim, quick_gelu) of an open_clip architecture, with `overrides` replacing vision-config fields
    (and `embed_dim`); the timm weights of a timm tower are never fetched."""
    import open_clip

    cfg = copy.deepcopy(OPEN_CLIP_CONFIGS.get(arch) or open_clip.get_model_config(arch))
    embed_dim = overrides.pop("embed_dim", cfg["embed_dim"])
    vision_cfg = {**cfg["vision_cfg"], **overrides}
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False
    return vision_cfg, embed_dim, bool(cfg.get("quick_gelu", False))


def open_clip_tower(arch: str, size: int | None, overrides: dict[str, Any]) -> tuple[nn.Module, int]:
    """open_clip's image tower for `arch` (the text tower is never built) and the input size it was built for."""
    from open_clip.model import _build_vision_tower

    vision_cfg, embed_dim, quick_gelu = open_clip_vision_cfg(arch, overrides)
    native = vision_cfg.get("image_size", 224)
    native = int(native[0] if isinstance(native, (tuple, list)) else native)
    if size is not None and not vision_cfg.get("timm_model_name"):
        vision_cfg["image_size"] = size  # a timm tower is built at its own size and resized after loading (set_input_size)
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu), native


def open_clip_data_config(arch: str, tag: str | None, size: int) -> DataConfig:
    """open_clip's preprocess config: its defaults (OpenAI mean and std, bicubic), then the pretrained tag's own."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    return DataConfig(size, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)), cfg.get("interpolation", "bicubic"))


def open_clip_parts(visual: nn.Module) -> dict[str, Any]:
    """How to read each kind of open_clip tower: the forward, the blocks, the first conv, patch size, prefix, pool rule."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        visual.output_tokens = True  # forward returns (pooled, tokens): the tokens after ln_post, CLS split off
        pool = ("an attention pool" if visual.attn_pool is not None else
                {"tok": "the CLS token after ln_post", "avg": "the mean of the patch tokens after ln_post"}.get(visual.pool_type, visual.pool_type))
        return dict(run=run_open_clip_vit, slots=[f"transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks))],
                    first_conv="conv1", patch_size=visual.patch_size[0], prefix_tokens=None,
                    pooled_rule=f"{pool}{', projected' if visual.proj is not None else ''} (open_clip's image embedding)")
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        return dict(run=run_open_clip_timm, slots=timm_blocks(trunk, "trunk."),
                    first_conv="trunk." + find_input_conv(trunk, (getattr(trunk, "pretrained_cfg", None) or {}).get("first_conv")),
                    patch_size=timm_patch_size(trunk), prefix_tokens=getattr(trunk, "num_prefix_tokens", None),
                    map_format=getattr(trunk, "output_fmt", "NCHW"),
                    pooled_rule=f"{timm_pool_rule(trunk)}{_trunk_head_words(trunk)}{_head_words(visual.head)} (open_clip's image "
                                "embedding)")
    if isinstance(visual, ModifiedResNet):
        return dict(run=run_open_clip_resnet, slots=[f"layer{i}" for i in (1, 2, 3, 4)], first_conv="conv1", patch_size=None,
                    prefix_tokens=None, pooled_rule="the attention pool (open_clip's image embedding)")
    raise MedfmError(f"open_clip built a {type(visual).__name__} image tower, which medfm cannot read; name the model by timm: or hf:")


def _trunk_head_words(trunk: nn.Module) -> str:
    """The trunk's own classifier where open_clip keeps it as the projection (`timm_proj` none: PE core's 768 -> 1024)."""
    head = getattr(trunk, "head", None)
    return f", projected by the trunk's head ({head.in_features} -> {head.out_features})" if isinstance(head, nn.Linear) else ""


def _head_words(head: nn.Module) -> str:
    parts = [type(m).__name__ for m in head.children() if not isinstance(m, nn.Dropout)]
    return f", then open_clip's head ({' -> '.join(parts)})" if parts else ""


def run_open_clip_vit(visual: nn.Module, x: torch.Tensor) -> Outputs:
    pooled, tokens = visual(x)
    return Outputs(pooled, tokens)


def run_open_clip_timm(visual: nn.Module, x: torch.Tensor) -> Outputs:
    """TimmModel.forward (`head(trunk(x))`), split where the trunk's features leave it."""
    final = visual.trunk.forward_features(x)
    return Outputs(visual.head(visual.trunk.forward_head(final)), final)


def run_open_clip_resnet(visual: nn.Module, x: torch.Tensor) -> Outputs:
    return Outputs(visual(x), None)  # the tokens: layer4's map, the last block's output


def load_open_clip(visual: nn.Module, weights: Path, arch: str) -> None:
    """The `visual.*` tensors of an open_clip checkpoint (or an image-tower-only file), position embedding resized by
    open_clip's own `resize_pos_embed`, loaded strictly."""
    from extract.backbones.openclip import visual_state_dict

    load_strict(visual, visual_state_dict(weights, visual), weights, f"open_clip {arch}'s image tower")


def build_open_clip(arch: str, tag: str | None, name: str, weights: Path | None, *, image_size: int | None = None,
                    protocol: str = "medfm", **overrides: Any) -> Backbone:
    options = take_medfm_options(overrides)
    size = image_size or overrides.pop("image_size", None)
    library_kwargs = dict(overrides)
    visual, native = open_clip_tower(arch, size, overrides)
    if weights is not None:
        load_open_clip(visual, weights, arch)
    if size is not None and size != native and hasattr(visual, "trunk"):  # a timm tower: timm's own resample
        if not hasattr(visual.trunk, "set_input_size"):
            raise MedfmError(f"{name}'s timm tower cannot change its input size; use --image-size {native}")
        visual.set_input_size(size)
    parts = open_clip_parts(visual)
    prefix = options.get("prefix_tokens", parts.pop("prefix_tokens"))
    backbone = LibraryBackbone(
        visual, name=name, data_config=open_clip_data_config(arch, tag, size or native), prefix_tokens=prefix,
        readout=options.get("readout", "model"), library_kwargs=library_kwargs, protocol=protocol, **parts,
    ).work_out()
    say_once(name, backbone.describe())
    return backbone


def resolve_open_clip(name: str) -> BackboneSpec:
    import open_clip

    parsed = check_library_name(name)
    arch, tag = parsed.model, parsed.tag
    tags = open_clip.list_pretrained_tags_by_model(arch)
    extra: dict[str, Any] = {"library": "open_clip"}
    if tag and tag not in tags:
        raise MedfmError(f"open_clip has no pretrained tag '{tag}' for {arch}" + (nearest(tag, tags) if tags else
                         "; it has no pretrained weights (pass --weights PATH or random)"))
    if tag is None and len(tags) == 1:  # one pretrained set (ViT-B-16-SigLIP2@webli): the name implies it
        tag = tags[0]
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    if hub:
        weights_file = f"{hub}/open_clip_model.safetensors"
        weights_url = f"https://huggingface.co/{hub}/resolve/main/open_clip_model.safetensors"
        hub_files = ((hub, "open_clip_model.safetensors"), (hub, "open_clip_pytorch_model.bin"))
    elif cfg.get("url"):
        weights_file, weights_url, hub_files = Path(urlparse(cfg["url"]).path).name, cfg["url"], ()
    else:
        weights_file, weights_url, hub_files = f"{arch}.safetensors", "", ()
        extra["find_weights"] = lambda: None
        extra["missing_weights"] = (f"{name} names no pretrained weights: name them as open_clip:{arch}@TAG "
                                    f"({', '.join(tags) if tags else 'it has none'}), or pass --weights PATH or --weights random")
    return BackboneSpec(
        name=name, study_row="", family="open_clip", build=partial(build_open_clip, arch, tag, name), weights_file=weights_file,
        weights_url=weights_url, hub_files=hub_files, pooled_dim=0, token_shape=(0, 0), count_params=partial(_count_open_clip, arch),
        notes="open_clip by name: the image tower only; pooled = the image embedding (encode_image); tokens = patch tokens",
        extra=extra,
    )


def _count_open_clip(arch: str) -> int:
    with torch.device("meta"):
        return count_parameters(open_clip_tower(arch, None, {})[0])


# --- Hugging Face transformers ---------------------------------------------------------------------------------------

RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL's codes (1: LANCZOS)
HEAD_KEYS = ("classifier.", "pooler.", "head.", "lm_head.")  # a checkpoint's task head: not part of the backbone


class HFVision(nn.Module):
    """The image side of a composite HF model (CLIP, SigLIP): its vision model and, where it has one, the projection
    that `get_image_features` applies (the text tower is dropped)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module | None) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection


def hf_config(folder: Path, overrides: dict[str, Any]) -> Any:
    """The model's config, with `overrides` set on its vision config (tiny test models, `--override`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    target = getattr(config, "vision_config", None) or config
    for key, value in overrides.items():
        if not hasattr(target, key):
            raise MedfmError(f"the {target.model_type} config has no field '{key}'; drop --override {key}=...")
        setattr(target, key, value)
    return config


def hf_vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _auto_model(make: Any, *args: Any, **kwargs: Any) -> Any:
    """AutoModel without a task pooler where the class has one to drop (ViT's dense+tanh pooler is not pretrained by
    most checkpoints); a class without that option is built as it is."""
    try:
        return make(*args, add_pooling_layer=False, **kwargs)
    except TypeError as err:
        if "add_pooling_layer" not in str(err):
            raise
        return make(*args, **kwargs)


def hf_model(config: Any, weights: Path | None, name: str) -> nn.Module:
    """AutoModel from the config (random, seeded by create_backbone), a folder (from_pretrained, every tensor accounted
    for) or a file (medfm's loader, strictly)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if weights is None:
        return _auto_model(AutoModel.from_config, config)
    if weights.is_dir():
        model, info = hf_from_pretrained(weights, config)
        problems = hf_load_problems(info)
        if problems:
            raise MedfmError(f"weights {weights} do not fit {name} ({problems}); pass the folder of this model")
        return model
    model = _auto_model(AutoModel.from_config, config)
    state_dict = load_state_dict(weights)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    if prefix and not any(k.startswith(prefix) for k in model.state_dict()) and any(k.startswith(prefix) for k in state_dict):
        state_dict = take_prefix(state_dict, prefix)  # a task model's checkpoint (e.g. Dinov2ForImageClassification)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_KEYS) or k in model.state_dict()}
    load_strict(model, state_dict, weights, name)
    return model


def hf_from_pretrained(folder: Path, config: Any) -> tuple[nn.Module, dict[str, Any]]:
    """AutoModel.from_pretrained in fp32, offline, with its loading report (returned, not logged: medfm judges it)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _auto_model(AutoModel.from_pretrained, folder, config=config, local_files_only=True, dtype=torch.float32,
                           output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def hf_load_problems(info: dict[str, Any]) -> str:
    """from_pretrained's loading report as one clause: missing, unexpected (a task head aside) and mismatched tensors."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(HEAD_KEYS) and ".pooler." not in k)
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched)) if keys]
    return "; ".join(parts)


def hf_blocks(model: nn.Module, config: Any) -> list[str]:
    """The encoder's block list: the ModuleList as long as the vision config's layers (or stages), an encoder's first."""
    depth = getattr(config, "num_hidden_layers", None)
    stages = len(getattr(config, "depths", ()) or ())
    found = [(path, len(m)) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for wanted in (depth, stages):
        hits = [path for path, n in found if n == wanted]
        if hits:
            best = next((p for p in hits if "encoder" in p), hits[0])
            return [f"{best}.{i}" for i in range(wanted)]
    return []


def hf_data_config(folder: Path, vision_config: Any, size: int | None) -> tuple[DataConfig, str]:
    """The image processor's config where the folder has one (preprocessor_config.json), else ImageNet's, said."""
    path = folder / "preprocessor_config.json"
    own = getattr(vision_config, "image_size", 224)
    own = int(own[0] if isinstance(own, (tuple, list)) else own)
    if not path.is_file():
        return (DataConfig(size or own, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
                "no preprocessor_config.json: ImageNet mean and std assumed (or pass --norm dataset)")
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size") if cfg.get("do_center_crop", True) else None
    sides = crop if isinstance(crop, dict) else cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
    side = sides.get("height") or sides.get("shortest_edge") or (crop if isinstance(crop, int) else None) or own
    return (DataConfig(size or int(side), tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD)),
                       RESAMPLE.get(cfg.get("resample", 3), "bicubic")), "")


def run_hf(kwargs: dict[str, Any], model: nn.Module, x: torch.Tensor) -> Outputs:
    """The model's forward (a composite's: its vision model, then its projection, as get_image_features). A model with no
    pooler_output (ViT built without its dense+tanh pooler) leaves the pooled feature to the library rule: CLS or mean."""
    vision = model.vision_model if isinstance(model, HFVision) else model
    out = vision(pixel_values=x, **kwargs)
    pooled = out.pooler_output
    if pooled is not None and isinstance(model, HFVision) and model.visual_projection is not None:
        pooled = model.visual_projection(pooled)
    return Outputs(pooled, out.last_hidden_state)


def hf_image_side(model: nn.Module) -> nn.Module:
    """The module medfm keeps: the model, or a composite's image tower and projection (`HFVision`)."""
    if hasattr(model, "vision_model") and hasattr(model, "get_image_features"):  # CLIP, SigLIP: the text tower is dropped
        return HFVision(model.vision_model, getattr(model, "visual_projection", None))
    return model


def hf_pool_words(vision: nn.Module) -> str:
    """What a transformers vision model's pooler_output is, read from its modules."""
    modules = list(vision.modules())
    if any("Attention" in type(m).__name__ and "Pool" in type(m).__name__ for m in modules):
        return "an attention pool"
    if any(isinstance(getattr(m, "post_layernorm", None), nn.Module) for m in modules):
        return "the CLS token after post_layernorm"
    if any(isinstance(getattr(m, "layernorm", None), nn.Module) for m in modules):
        return "the CLS token after the final layernorm"
    return "the model's pooled output"


def build_hf(folder: Path, name: str, weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm",
             **overrides: Any) -> Backbone:
    options = take_medfm_options(overrides)
    config = hf_config(folder, overrides)
    data_config, norm_note = hf_data_config(folder, hf_vision_config(config), image_size)
    model = hf_image_side(hf_model(config, weights, name))
    return hf_backbone(model, config, name, data_config, options, overrides, protocol, norm_note)


def hf_backbone(model: nn.Module, config: Any, name: str, data_config: DataConfig, options: dict[str, Any],
                overrides: dict[str, Any], protocol: str = "medfm", norm_note: str = "") -> Backbone:
    """A built transformers model (`hf_image_side`'s) as a `LibraryBackbone`, worked out and said once; `options` are
    medfm's own (`take_medfm_options`), `overrides` the config fields it was built with."""
    vision_config = hf_vision_config(config)
    vision = model.vision_model if isinstance(model, HFVision) else model
    kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(vision.forward).parameters else {}
    patch = getattr(vision_config, "patch_size", None)
    projected = ", projected (get_image_features)" if isinstance(model, HFVision) and model.visual_projection is not None else ""
    backbone = LibraryBackbone(
        model, name=name, data_config=data_config, run=partial(run_hf, kwargs), slots=hf_blocks(model, vision_config),
        first_conv=find_input_conv(model), patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else None,
        prefix_tokens=options.get("prefix_tokens"), readout=options.get("readout", "model"), library_kwargs=dict(overrides),
        protocol=protocol, pooled_rule=f"{hf_pool_words(vision)} ({type(vision).__name__}'s pooler_output){projected}",
    ).work_out()
    say_once(name, backbone.describe() + (f"; {norm_note}" if norm_note else ""))
    return backbone


def resolve_hf(name: str) -> BackboneSpec:
    parsed = check_library_name(name)
    folder = hf_folder(parsed.model)
    local = Path(parsed.model).expanduser().is_dir()

    def find_weights() -> Path | None:
        return folder if any((folder / f).is_file() for f in HF_WEIGHT_FILES) else None

    extra = {
        "library": "hf", "folder": str(folder), "find_weights": find_weights,
        "architecture": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "missing_weights": (f"{name}: the folder {folder} holds no weights ({' or '.join(HF_WEIGHT_FILES[:2])}); "
                            "pass --weights PATH or --weights random"),
    }
    return BackboneSpec(
        name=name, study_row="", family="hf", build=partial(build_hf, folder, name), weights_file="model.safetensors",
        weights_url="" if local else f"https://huggingface.co/{parsed.model}", pooled_dim=0, token_shape=(0, 0),
        count_params=partial(_count_hf, folder), extra=extra,
        notes="hf by name: AutoModel (the image tower of a composite model); pooled = pooler_output, else CLS or mean",
    )


def _count_hf(folder: Path) -> int:
    from transformers import AutoModel

    with torch.device("meta"):
        model = hf_image_side(_auto_model(AutoModel.from_config, hf_config(folder, {})))
    return count_parameters(model)


register_library("timm", resolve_timm)
register_library("open_clip", resolve_open_clip)
register_library("hf", resolve_hf)

