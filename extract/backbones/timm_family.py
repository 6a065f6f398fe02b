"""The ImageNet baselines and DINOv2, built with timm: `deit`, `dino`, `dinov2`, `resnet152`.

DINOv2 under `protocol="study"` is `HubDinoV2ViT`: it keeps the checkpoint's native position table (37 x 37)
and interpolates it at every forward as the 2023 torch.hub DINOv2 did (docs/protocol.md §7, row 7).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from extract.backbones.base import Backbone, BackboneSpec, DataConfig, Features, count_parameters
from extract.backbones.registry import register
from extract.backbones.weights import load_state_dict, mismatch_error


def create_timm_model(model_name: str, weights: Path | dict[str, torch.Tensor] | None, *, weights_path: Path | None = None,
                      **kwargs: Any) -> nn.Module:
    """timm.create_model with weights loaded safely by us, converted by timm's own checkpoint filter, strictly.

    timm loads non-strictly whenever the model's head differs from the pretrained one, so a file missing
    trunk tensors would leave them random. We drop the classifier ourselves and declare a headless
    pretrained config, which keeps timm's load strict. `weights_path` names the file in errors when
    `weights` is its already loaded state dict.
    """
    if weights is None:
        return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    state_dict = load_state_dict(weights) if isinstance(weights, Path) else weights
    heads = timm.models.get_pretrained_cfg(model_name).classifier or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(tuple(f"{h}." for h in heads))}
    overlay = {"state_dict": state_dict, "num_classes": 0}
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)
    except RuntimeError as err:
        raise mismatch_error(err, weights if isinstance(weights, Path) else weights_path, model_name) from None


DINOV2 = "vit_base_patch14_dinov2.lvd142m"


def timm_data_config(model: nn.Module, image_size: int) -> DataConfig:
    cfg = timm.data.resolve_model_data_config(model)
    return DataConfig(image_size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])


class TimmViT(Backbone):
    """A timm VisionTransformer: pooled = CLS after the final norm; tokens = patch tokens.

    `prenorm_tokens` keeps the tokens before the final norm (the study's DINOv2 DeiT-head input);
    `pooled_index` is the normed token read as the pooled feature (0, the CLS; BLIP's study protocol reads 1).
    """

    first_conv = "model.patch_embed.proj"

    def __init__(self, model: nn.Module, image_size: int, prenorm_tokens: bool = False, data_config: DataConfig | None = None,
                 pooled_index: int = 0, protocol: str = "medfm") -> None:
        super().__init__(data_config or timm_data_config(model, image_size), model.embed_dim, model.embed_dim, protocol)
        self.model = model
        self.prenorm_tokens = prenorm_tokens
        self.pooled_index = pooled_index

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.model.blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def readout(self, h: torch.Tensor, index: int) -> Features:
        normed = self.model.norm(h)
        skip = self.model.num_prefix_tokens
        return Features(normed[:, self.pooled_index], (h if self.prenorm_tokens else normed)[:, skip:])


def hub_dinov2_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.hub DINOv2's `interpolate_pos_encoding` (2023): the native M x M table (+ CLS) for a rows x cols grid.

    Bicubic with `scale_factor=((rows + 0.1) / M, (cols + 0.1) / M)` and no antialias, computed in fp32 and cast
    to the tokens' dtype; the table is returned as is when the grid is the native one.
    """
    num_patches = pos_embed.shape[1] - 1
    if num_patches == rows * cols and rows == cols:
        return pos_embed
    side = math.isqrt(num_patches)
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # the +0.1 is DINO's guard against a floating-point error in the output size (facebookresearch/dino issue 8)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise ValueError(f"DINOv2 position table resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1).to(dtype)


class HubDinoV2ViT(TimmViT):
    """DINOv2 as the study ran it (torch.hub): the native position table is the parameter, interpolated at every forward.

    The timm model is built at the checkpoint's native size (518 px, a 37 x 37 table) with a dynamic patch grid,
    so the table loads unresampled and, unfrozen, trains at 37 x 37; `hub_dinov2_pos_embed` fits it to the
    input's grid on each call. Everything after the position embedding is the same timm ViT.
    """

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        h = m.patch_embed(x)  # (B, rows, cols, C): the model was built with a dynamic grid
        batch, rows, cols, dim = h.shape
        h = torch.cat([m.cls_token.expand(batch, -1, -1), h.reshape(batch, rows * cols, dim)], dim=1)
        h = h + hub_dinov2_pos_embed(m.pos_embed, rows, cols, h.dtype)
        return m.norm_pre(m.patch_drop(m.pos_drop(h)))


class TimmResNet(Backbone):
    """A timm ResNet: blocks = layer1..layer4; pooled = global average pool; tokens = the final map."""

    first_conv = "model.conv1"

    def __init__(self, model: nn.Module, image_size: int, protocol: str = "medfm") -> None:
        super().__init__(timm_data_config(model, image_size), model.num_features, model.num_features, protocol)
        self.model = model
        self._blocks = [model.layer1, model.layer2, model.layer3, model.layer4]

    @property
    def blocks(self) -> list[nn.Module]:  # type: ignore[override]
        return self._blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def readout(self, h: torch.Tensor, index: int) -> Features:
        return Features(h.mean((2, 3)), h.flatten(2).transpose(1, 2))


def _vit_builder(model_name: str, prenorm_tokens: bool = False):
    def build(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
        size = image_size or overrides.pop("img_size", 224)
        model = create_timm_model(model_name, weights, img_size=size, **overrides)
        return TimmViT(model, size, prenorm_tokens, protocol=protocol)

    return build


def _build_dinov2(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    """DINOv2: timm's resample-once at load (medfm), or the study's torch.hub per-forward interpolation (`HubDinoV2ViT`)."""
    if protocol != "study":
        return _vit_builder(DINOV2, prenorm_tokens=True)(weights, image_size=image_size, protocol=protocol, **overrides)
    size = image_size or overrides.pop("img_size", 224)
    overrides.pop("img_size", None)
    state_dict = load_state_dict(weights) if weights is not None else None
    native = _native_img_size(state_dict, overrides.get("patch_size", 14))
    model = create_timm_model(DINOV2, state_dict, weights_path=weights, img_size=native, dynamic_img_size=True, **overrides)
    return HubDinoV2ViT(model, size, prenorm_tokens=True, protocol=protocol)


def _native_img_size(state_dict: dict[str, torch.Tensor] | None, patch_size: int) -> int:
    """The input size whose grid is the checkpoint's position table (518 px for the official file); timm's default
    (also 518) for random weights."""
    table = (state_dict or {}).get("pos_embed")
    if table is None:
        return timm.models.get_pretrained_cfg(DINOV2).input_size[-1]
    return math.isqrt(table.shape[1] - 1) * patch_size


def _build_resnet(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    model = create_timm_model("resnet152.tv_in1k", weights, **overrides)
    return TimmResNet(model, image_size or 224, protocol)


def _count_at_native(model_name: str):
    """Parameters at the model's native resolution, without classifier, built on the meta device."""

    def count() -> int:
        with torch.device("meta"):
            return count_parameters(timm.create_model(model_name, pretrained=False, num_classes=0))

    return count


register(BackboneSpec(
    name="deit", study_row="ImNet-1k-Sup (DeiT-B)", family="timm",
    build=_vit_builder("deit_base_patch16_224.fb_in1k"),
    weights_file="deit_base_patch16_224-b5f2ef4d.pth",
    weights_url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth",
    hub_files=(("timm/deit_base_patch16_224.fb_in1k", "model.safetensors"),),
    pooled_dim=768, token_shape=(196, 768),
    count_params=_count_at_native("deit_base_patch16_224"),
    notes="pooled: CLS after the final norm; tokens: normed patch tokens",
))
register(BackboneSpec(
    name="dino", study_row="DINOv1 ViT-B/16", family="timm",
    build=_vit_builder("vit_base_patch16_224.dino"),
    weights_file="dino_vitbase16_pretrain.pth",
    weights_url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    hub_files=(("timm/vit_base_patch16_224.dino", "model.safetensors"),),
    pooled_dim=768, token_shape=(196, 768),
    count_params=_count_at_native("vit_base_patch16_224"),
    notes="pooled: CLS after the final norm; tokens: normed patch tokens",
))
register(BackboneSpec(
    name="dinov2", study_row="DINOv2 ViT-B/14, LVD-142M", family="timm",
    build=_build_dinov2,
    weights_file="dinov2_vitb14_pretrain.pth",
    weights_url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    hub_files=(("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),),
    pooled_dim=768, token_shape=(256, 768),
    count_params=_count_at_native("vit_base_patch14_dinov2"),
    notes="pooled: normed CLS; tokens: 256 pre-norm patch tokens (the study's DeiT-head input)",
))
register(BackboneSpec(
    name="resnet152", study_row="ResNet152, ImageNet", family="timm",
    build=_build_resnet,
    weights_file="resnet152-394f9c45.pth",
    weights_url="https://download.pytorch.org/models/resnet152-394f9c45.pth",
    hub_files=(("timm/resnet152.tv_in1k", "model.safetensors"),),
    pooled_dim=2048, token_shape=(49, 2048),
    count_params=_count_at_native("resnet152"),
    notes="pooled: global average pool; tokens: the 7x7 final map",
))
