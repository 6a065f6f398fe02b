"""`openclip`: the image tower of open_clip's ViT-B-16 (LAION-2B, `laion2b_s34b_b88k`).

Only the visual tower is built (the text tower is never used). A checkpoint is read with our safe
loader; its `visual.*` tensors go through open_clip's own position-embedding resize, then load strictly.
open_clip is imported on first use: it is slow to import and most runs do not need it.
Under `protocol="study"` the tokens are taken before `ln_post`, as the study's patched open_clip returns them
(env_files/open_clip/transformer.py of the official repository; docs/protocol.md §7, row 6).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

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
from extract.backbones.weights import load_state_dict, load_strict, take_prefix

MODEL = "ViT-B-16"


def visual_tower(image_size: int, **overrides: Any) -> nn.Module:
    """open_clip's vision tower for ViT-B-16 at `image_size`; `overrides` replace vision-config fields (and embed_dim)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(MODEL)
    embed_dim = overrides.pop("embed_dim", cfg["embed_dim"])
    vision_cfg = {**cfg["vision_cfg"], **overrides, "image_size": image_size}
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=cfg.get("quick_gelu", False))


def visual_state_dict(path: Path, visual: nn.Module) -> dict[str, torch.Tensor]:
    """The `visual.*` tensors of an open_clip checkpoint, position embedding resized to the tower's grid."""
    from open_clip.model import resize_pos_embed

    state_dict = load_state_dict(path)
    if any(k.startswith("visual.") for k in state_dict):
        state_dict = take_prefix(state_dict, "visual.")
    full = {f"visual.{k}": v for k, v in state_dict.items()}
    resize_pos_embed(full, SimpleNamespace(visual=visual))  # open_clip's own resize reads only `model.visual`
    return take_prefix(full, "visual.")


class OpenCLIPBackbone(Backbone):
    """pooled = the projected image embedding (512); tokens = the 196 patch tokens after ln_post (768), or before it
    under the study protocol. The pooled feature, `ln_post(CLS) @ proj`, is the same under both."""

    first_conv = "model.conv1"

    def __init__(self, visual: nn.Module, image_size: int, protocol: str = "medfm") -> None:
        super().__init__(DataConfig(image_size, CLIP_MEAN, CLIP_STD, "bicubic"), visual.output_dim, visual.conv1.out_channels,
                         protocol)
        self.model = visual

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.transformer.resblocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.model._embeds(x)

    def readout(self, h: torch.Tensor, index: int) -> Features:
        pooled, tokens = self.model._pool(h)
        if self.protocol == "study":
            _, tokens = self.model._global_pool(h)  # the same split, before ln_post
        return Features(pooled @ self.model.proj, tokens)


def build(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    size = image_size or 224
    visual = visual_tower(size, **overrides)
    if not visual.transformer.batch_first:
        raise ValueError("open_clip built a sequence-first transformer; this wrapper feeds (batch, tokens, dim)")
    if weights is not None:
        load_strict(visual, visual_state_dict(weights, visual), weights, f"open_clip {MODEL}'s image tower")
    return OpenCLIPBackbone(visual, size, protocol)


def count_params() -> int:
    """The visual tower including its 768 -> 512 projection."""
    with torch.device("meta"):
        return count_parameters(visual_tower(224))


register(BackboneSpec(
    name="openclip", study_row="OpenCLIP ViT-B-16, LAION-2B", family="open_clip", build=build,
    weights_file="open_clip_pytorch_model.bin",
    weights_url="https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K/resolve/main/open_clip_pytorch_model.bin",
    hub_files=(("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"),
               ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_pytorch_model.bin")),
    pooled_dim=512, token_shape=(196, 768), count_params=count_params,
    notes="pooled: projected image embedding; tokens: patch tokens after ln_post",
))
