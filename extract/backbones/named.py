"""The study's question asked of later models: the 2025 natural-domain models (`common.study.MODERN_BACKBONES`) and the
medical references (`MEDICAL_BACKBONES`) as named registry rows (docs/backbones.md §10).

A row is a library model with its study-row settings fixed (input size 224, readout, norm, official weights file), built
by the by-name adapters (`extract/backbones/by_name.py`), so no architecture is written here. timm and open_clip build
theirs by name; the two transformers models and BiomedCLIP (which open_clip knows only from its hub config) are built
from their official config files' values, held in the row, so that random weights and `extract backbones` need no
download. Constructor overrides reach the library as for `timm:` & co.: tests build tiny instances of the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common.errors import MedfmError
from extract.backbones.base import Backbone, BackboneSpec, DataConfig, count_parameters
from extract.backbones.by_name import (
    OPEN_CLIP_CONFIGS,
    build_open_clip,
    build_timm,
    hf_backbone,
    hf_load_problems,
    open_clip_tower,
)
from extract.backbones.library import take_medfm_options
from extract.backbones.registry import register
from extract.backbones.weights import load_state_dict

SIZE = 224  # the study's input size; every row's models take it (position embeddings resampled or interpolated)


@dataclass(frozen=True)
class Row:
    """A named row: what it is, the library model and settings that build it, and where its official weights live."""

    name: str
    what: str  # `study_row`: the listing's and the cache's description
    library: str  # timm | open_clip | hf
    model: str  # timm's NAME.TAG, open_clip's ARCH[@TAG], or transformers' model_type
    hub: str  # the Hugging Face repository of the official weights
    file: str  # their file there
    pooled_dim: int  # at 224 px
    token_shape: tuple[int, int]
    notes: str
    settings: dict[str, Any] = field(default_factory=dict)  # constructor settings of the row (readout, pooling)
    config: dict[str, Any] = field(default_factory=dict)  # hf: the official config.json's fields
    tower: str = ""  # hf: the prefix of the image tower's tensors in a file that holds the text tower too (kept)
    norm: DataConfig | None = None  # hf: the image processor's mean, std and resize
    also: tuple[tuple[str, str], ...] = ()  # other hub files that load: a library's converted copy


def build(row: Row, weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    """The row's library model at `image_size` (224), the row's settings under the caller's `overrides`."""
    settings = row.settings | overrides
    size = image_size or SIZE
    if row.library == "timm":
        return build_timm(row.model, row.name, weights, image_size=size, protocol=protocol, **settings)
    if row.library == "open_clip":
        arch, _, tag = row.model.partition("@")
        return build_open_clip(arch, tag or None, row.name, weights, image_size=size, protocol=protocol, **settings)
    return build_transformers(row, weights, size, protocol, settings)


def transformers_config(row: Row, overrides: dict[str, Any]) -> Any:
    """The official config of a transformers row, with `overrides` set on it (tiny test models, `--override`)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(row.model, **row.config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise MedfmError(f"the {config.model_type} config of {row.name} has no field '{key}'; drop --override {key}=...")
        setattr(config, key, value)
    return config


def build_transformers(row: Row, weights: Path | None, size: int, protocol: str, settings: dict[str, Any]) -> Backbone:
    """The row's transformers model from its config; a file's image tower (its text tower dropped) loaded by transformers'
    own loader from the tensors medfm's safe loader read, so the hub's older tensor names are converted as
    `from_pretrained` converts them; any missing, unexpected or reshaped tensor is one line."""
    from transformers import MODEL_MAPPING, AutoModel
    from transformers.utils import logging as hf_logging

    options = take_medfm_options(settings)
    config = transformers_config(row, settings)
    if weights is None:
        model = AutoModel.from_config(config)
    else:
        state = load_state_dict(weights)
        if row.tower:
            state = {k: v for k, v in state.items() if k.startswith(row.tower)}
        hf_logging.disable_progress_bar()
        model, info = MODEL_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=state, dtype=torch.float32,
                                                                  output_loading_info=True)
        if problems := hf_load_problems(info):
            raise MedfmError(f"weights file {weights} does not fit {row.name} ({problems}); pass the official file for this backbone")
    assert row.norm is not None, f"{row.name}: a transformers row declares its processor's norm"
    return hf_backbone(model, config, row.name, replace(row.norm, input_size=size), options, settings, protocol)


def count_params(row: Row) -> int:
    """Parameters at the model's native input size, no classifier (the study's convention, `extract backbones`)."""
    with torch.device("meta"):
        if row.library == "timm":
            import timm

            model = timm.create_model(row.model, pretrained=False, num_classes=0)
        elif row.library == "open_clip":
            model = open_clip_tower(row.model.partition("@")[0], None, {})[0]
        else:
            from transformers import AutoModel

            model = AutoModel.from_config(transformers_config(row, {}))
    return count_parameters(model)


def spec(row: Row) -> BackboneSpec:
    """The registry entry; its weights file is `<repository>/<file>` in $MEDFM_WEIGHTS_DIR, laid out as by-name ones are."""
    return BackboneSpec(
        name=row.name, study_row=row.what, family=row.library, build=partial(build, row), weights_file=f"{row.hub}/{row.file}",
        weights_url=f"https://huggingface.co/{row.hub}/resolve/main/{row.file}", hub_files=((row.hub, row.file), *row.also),
        pooled_dim=row.pooled_dim, token_shape=row.token_shape, count_params=partial(count_params, row), notes=row.notes,
    )


BIOMEDCLIP = "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
OPEN_CLIP_CONFIGS[BIOMEDCLIP] = {  # the model_cfg of its open_clip_config.json; the text tower (PubMedBERT) is never built
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                   "image_size": 224},
    "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                 "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
}

ROWS = (
    Row("dinov3", "DINOv3 ViT-B/16, LVD-1689M", "timm", "vit_base_patch16_dinov3.lvd1689m", "timm/vit_base_patch16_dinov3.lvd1689m",
        "model.safetensors", 768, (196, 768), settings={"global_pool": "token"},
        notes="pooled: normed CLS (DINOv3's own readout, not timm's default mean); tokens: normed patch tokens, 4 registers dropped"),
    Row("siglip2", "SigLIP 2 ViT-B/16, WebLI", "open_clip", "ViT-B-16-SigLIP2@webli", "timm/ViT-B-16-SigLIP2", "open_clip_model.safetensors",
        768, (196, 768), notes="pooled: the MAP attention pool (the image embedding); tokens: normed patch tokens"),
    Row("sam2", "SAM 2.1 Hiera-B+ image encoder", "timm", "sam2_hiera_base_plus.fb_r896_2pt1", "timm/sam2_hiera_base_plus.fb_r896_2pt1",
        "model.safetensors", 896, (49, 896), settings={"readout": "mean"},
        notes="pooled: mean of the last stage's map (as sam); tokens: the 7x7 last-stage map; no FPN neck"),
    Row("radio", "C-RADIOv3 ViT-B/16", "timm", "vit_base_patch16_radio_v3.c_radio", "nvidia/C-RADIOv3-B", "model.safetensors", 768, (196, 768),
        also=(("timm/vit_base_patch16_radio_v3.c_radio", "model.safetensors"),),
        notes="pooled: the first CLS token (no final norm); tokens: patch tokens, 8 CLS and register tokens dropped"),
    Row("pe_core", "Perception Encoder core B/16", "open_clip", "PE-Core-B-16@meta", "timm/PE-Core-B-16", "open_clip_model.safetensors",
        1024, (196, 768), notes="pooled: attention pool then projection (the image embedding); tokens: normed patch tokens"),
    Row("rad_dino", "RAD-DINO ViT-B/14, chest X-rays", "hf", "dinov2", "microsoft/rad-dino", "model.safetensors", 768, (256, 768),
        config={"image_size": 518},  # the rest of dinov2-base's fields are transformers' Dinov2Config defaults
        norm=DataConfig(SIZE, (0.5307,) * 3, (0.2583,) * 3, "bicubic"),
        notes="pooled: CLS after the final layernorm (pooler_output); tokens: normed patch tokens"),
    Row("medsiglip", "MedSigLIP so400m/14 image tower", "hf", "siglip_vision_model", "google/medsiglip-448", "model.safetensors", 1152,
        (256, 1152), config={"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,  # SigLIP so400m/14 at 448;
                             "num_attention_heads": 16, "patch_size": 14, "image_size": 448},  # the rest: SiglipVisionConfig's defaults
        tower="vision_model.", norm=DataConfig(SIZE, (0.5,) * 3, (0.5,) * 3, "bilinear"),
        notes="pooled: the MAP attention pool (get_image_features); tokens: patch tokens after post_layernorm; text tower dropped"),
    Row("biomedclip", "BiomedCLIP ViT-B/16, PMC-15M", "open_clip", BIOMEDCLIP, f"microsoft/{BIOMEDCLIP}", "open_clip_pytorch_model.bin",
        512, (196, 768), notes="pooled: normed CLS then the linear projection (the image embedding); tokens: normed patch tokens"),
)

for _row in ROWS:
    register(spec(_row))
