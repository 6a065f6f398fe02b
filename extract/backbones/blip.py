"""`blip`: BLIP's ViT-B/16 image encoder, from the original `model_base.pth` or from HF-format weights.

The original checkpoint keeps the encoder under `visual_encoder.*` with timm's key names, so it loads
strictly into timm's ViT-B/16. A folder of HF-format weights (config.json + model.safetensors) goes through
`BlipForConditionalGeneration`: `BlipVisionModel.from_pretrained` on a full BLIP folder silently keeps random
vision weights. Pooled = the CLS token (index 0); the study's code took index 1, a patch token
(`x[:,1,:]` after the final norm, utils/transformers/vit.py of the official repository), which
`protocol="study"` reproduces (docs/protocol.md §7, row 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import MedfmError
from extract.backbones.base import (
    CLIP_MEAN,
    CLIP_STD,
    Backbone,
    BackboneSpec,
    DataConfig,
    Features,
    count_parameters,
)
from extract.backbones.registry import register
from extract.backbones.timm_family import TimmViT, create_timm_model
from extract.backbones.weights import load_state_dict, take_prefix

TIMM_NAME = "vit_base_patch16_224"


STUDY_POOLED_INDEX = 1  # the official BLIP wrapper returns `x[:, 1, :]`, the first patch token, as its pooled feature


def blip_data_config(image_size: int) -> DataConfig:
    return DataConfig(image_size, CLIP_MEAN, CLIP_STD, "bicubic")


def pooled_index(protocol: str) -> int:
    """Which normed token is the pooled feature: the CLS token (0), or the study's token 1."""
    return STUDY_POOLED_INDEX if protocol == "study" else 0


class HFBlipVision(Backbone):
    """transformers' BLIP vision model: pooled = CLS after the post-LayerNorm (once, not HF's double-normed
    pooler_output; token 1 under the study protocol); tokens = the normed patch tokens. Position embeddings are
    interpolated to the input size."""

    first_conv = "model.embeddings.patch_embedding"

    def __init__(self, vision: nn.Module, image_size: int, protocol: str = "medfm") -> None:
        dim = vision.config.hidden_size
        super().__init__(blip_data_config(image_size), dim, dim, protocol)
        self.model = vision

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.encoder.layers

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(x, interpolate_pos_encoding=True)

    def readout(self, h: torch.Tensor, index: int) -> Features:
        normed = self.model.post_layernorm(h)
        return Features(normed[:, pooled_index(self.protocol)], normed[:, 1:])


def hf_vision_model(folder: Path) -> nn.Module:
    """The vision tower of an HF-format BLIP folder; an error if any of its tensors was not in the files."""
    from transformers import BlipForConditionalGeneration

    try:
        model, info = BlipForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, weights_only=True, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise MedfmError(f"cannot load HF-format BLIP weights from {folder}: {str(err).splitlines()[0]}") from None
    missing = [k for k in info["missing_keys"] if k.startswith("vision_model.")]
    if missing:
        raise MedfmError(f"{folder} lacks {len(missing)} vision tensors (e.g. {missing[0]}); pass a full BLIP folder")
    return model.vision_model


def original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The image encoder of BLIP's original checkpoint (`visual_encoder.*`, prefix stripped)."""
    state_dict = take_prefix(load_state_dict(path), "visual_encoder.")
    if not state_dict:
        raise MedfmError(
            f"{path} holds no 'visual_encoder.*' tensors; pass BLIP's model_base.pth or a folder of HF-format BLIP weights"
        )
    return state_dict


def build(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    size = image_size or 224
    if weights is not None and weights.is_dir():
        return HFBlipVision(hf_vision_model(weights), size, protocol)
    state_dict = original_state_dict(weights) if weights is not None else None
    model = create_timm_model(TIMM_NAME, state_dict, img_size=size, **overrides)
    return TimmViT(model, size, data_config=blip_data_config(size), pooled_index=pooled_index(protocol), protocol=protocol)


def count_params() -> int:
    with torch.device("meta"):
        return count_parameters(create_timm_model(TIMM_NAME, None))


register(BackboneSpec(
    name="blip", study_row="BLIP ViT-B/16", family="blip", build=build,
    weights_file="model_base.pth",
    weights_url="https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base.pth",
    pooled_dim=768, token_shape=(196, 768), count_params=count_params,
    notes="pooled: CLS (index 0) after the final norm; tokens: normed patch tokens; also HF-format folders",
))
