"""The ImageNet baselines and DINOv2, built with timm: `deit`, `dino`, `dinov2`, `resnet152`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from extract.backbones import register
from extract.backbones.base import Backbone, BackboneSpec, DataConfig, Features, count_parameters
from extract.backbones.weights import load_state_dict, mismatch_error


def create_timm_model(model_name: str, weights: Path | dict[str, torch.Tensor] | None, **kwargs: Any) -> nn.Module:
    """timm.create_model with weights loaded safely by us, converted by timm's own checkpoint filter, strictly.

    timm loads non-strictly whenever the model's head differs from the pretrained one, so a file missing
    trunk tensors would leave them random. We drop the classifier ourselves and declare a headless
    pretrained config, which keeps timm's load strict.
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
        raise mismatch_error(err, weights if isinstance(weights, Path) else None, model_name) from None


def timm_data_config(model: nn.Module, image_size: int) -> DataConfig:
    cfg = timm.data.resolve_model_data_config(model)
    return DataConfig(image_size, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"])


class TimmViT(Backbone):
    """A timm VisionTransformer: pooled = CLS after the final norm; tokens = patch tokens.

    `prenorm_tokens` keeps the tokens before the final norm (the study's DINOv2 DeiT-head input).
    """

    first_conv = "model.patch_embed.proj"

    def __init__(self, model: nn.Module, image_size: int, prenorm_tokens: bool = False, data_config: DataConfig | None = None) -> None:
        super().__init__(data_config or timm_data_config(model, image_size), model.embed_dim, model.embed_dim)
        self.model = model
        self.prenorm_tokens = prenorm_tokens

    @property
    def blocks(self) -> nn.Module:  # type: ignore[override]
        return self.model.blocks

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def readout(self, h: torch.Tensor, index: int) -> Features:
        normed = self.model.norm(h)
        skip = self.model.num_prefix_tokens
        return Features(normed[:, 0], (h if self.prenorm_tokens else normed)[:, skip:])


class TimmResNet(Backbone):
    """A timm ResNet: blocks = layer1..layer4; pooled = global average pool; tokens = the final map."""

    first_conv = "model.conv1"

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__(timm_data_config(model, image_size), model.num_features, model.num_features)
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
    def build(weights: Path | None, *, image_size: int | None = None, **overrides: Any) -> Backbone:
        size = image_size or overrides.pop("img_size", 224)
        model = create_timm_model(model_name, weights, img_size=size, **overrides)
        return TimmViT(model, size, prenorm_tokens)

    return build


def _build_resnet(weights: Path | None, *, image_size: int | None = None, **overrides: Any) -> Backbone:
    model = create_timm_model("resnet152.tv_in1k", weights, **overrides)
    return TimmResNet(model, image_size or 224)


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
    build=_vit_builder("vit_base_patch14_dinov2.lvd142m", prenorm_tokens=True),
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
