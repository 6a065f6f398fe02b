"""`sam`: Segment Anything's ViT-B image encoder, run at 224 without its neck (the study's trunk features).

segment_anything's encoder adds a fixed 64x64 position embedding, so it cannot take 224 inputs as
shipped. We build it at the requested size and resize the checkpoint to fit before a strict load:
the position embedding bicubic with antialiasing (as timm's SAM does at run time), and the
global-attention blocks' relative-position tables linearly (as segment_anything's `get_rel_pos` would).
Under `protocol="study"` those tables are resized as the official code did, with `F.interpolate(size=...)`
and its default mode, nearest (`filter_interpolate_weights` in utils/transformers/sam.py of the official
repository; docs/protocol.md §7, row 5).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from timm.layers import resample_abs_pos_embed_nhwc
from torch import nn

from extract.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    DataConfig,
    Features,
    count_parameters,
)
from extract.backbones.registry import register
from extract.backbones.weights import load_state_dict, load_strict, take_prefix

VIT_B = dict(
    embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0, qkv_bias=True,
    use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11),
)
NATIVE_SIZE = 1024


def sam_encoder(image_size: int, **overrides: Any) -> nn.Module:
    """segment_anything's ImageEncoderViT with the vit_b arguments (tests override them), neck removed."""
    encoder = ImageEncoderViT(img_size=image_size, norm_layer=partial(nn.LayerNorm, eps=1e-6), **{**VIT_B, **overrides})
    encoder.neck = nn.Identity()  # the study reads the 768-d trunk; the 256-d neck is not part of the model
    return encoder


REL_POS_MODE = {"medfm": "linear", "study": "nearest"}  # how each protocol resizes the relative-position tables


def fit_checkpoint(state_dict: dict[str, torch.Tensor], encoder: nn.Module, protocol: str = "medfm") -> dict[str, torch.Tensor]:
    """The encoder's tensors of an official SAM file (or timm's copy of it), resized to the encoder's grid, neck dropped.

    Only the global-attention blocks' relative-position tables change size (127 -> 27 rows at 224 px): the
    windowed blocks' tables fit the 14-token window whatever the input size. `protocol` picks the resize mode.
    """
    if any(k.startswith("image_encoder.") for k in state_dict):
        state_dict = take_prefix(state_dict, "image_encoder.")
    else:  # timm's `samvit_base_patch16.sa1b` names the MLP layers fc1/fc2
        state_dict = {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("neck.")}
    target = encoder.state_dict()
    out = {}
    for key, value in state_dict.items():
        shape = target[key].shape if key in target else value.shape
        if key == "pos_embed" and value.shape != shape:
            value = resample_abs_pos_embed_nhwc(value, list(shape[1:3]))
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape != shape:
            value = F.interpolate(value.T[None], size=shape[0], mode=REL_POS_MODE[protocol])[0].T
        out[key] = value
    return out


class SAMBackbone(Backbone):
    """pooled = mean of the last block's 14x14 map (768); tokens = that map as 196 tokens. No CLS token."""

    first_conv = "model.patch_embed.proj"

    def __init__(self, encoder: nn.Module, image_size: int, protocol: str = "medfm") -> None:
        dim = encoder.patch_embed.proj.out_channels
        super().__init__(DataConfig(image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), dim, dim, protocol)
        self.model = encoder

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.patch_embed(x) + self.model.pos_embed  # (B, H, W, C), channels last

    def readout(self, h: torch.Tensor, index: int) -> Features:
        return Features(h.mean((1, 2)), h.flatten(1, 2))


def build(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    size = image_size or 224
    encoder = sam_encoder(size, **overrides)
    if weights is not None:
        load_strict(encoder, fit_checkpoint(load_state_dict(weights), encoder, protocol), weights, "the SAM ViT-B image encoder")
    return SAMBackbone(encoder, size, protocol)


def count_params() -> int:
    """The study's count: the trunk without the neck, with the native 64x64 position embedding."""
    with torch.device("meta"):
        return count_parameters(sam_encoder(NATIVE_SIZE))


register(BackboneSpec(
    name="sam", study_row="SAM ViT-B, SA-1B", family="segment_anything", build=build,
    weights_file="sam_vit_b_01ec64.pth",
    weights_url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    hub_files=(("timm/samvit_base_patch16.sa1b", "model.safetensors"),),
    pooled_dim=768, token_shape=(196, 768), count_params=count_params,
    notes="pooled: mean of the last block's map; tokens: that 14x14 map, no neck",
))
