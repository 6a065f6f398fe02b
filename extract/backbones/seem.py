"""`seem`: SEEM's Focal-T backbone, the X-Decoder "focal_dw" FocalNet, as a module of our own.

Stock FocalNets (timm, transformers) differ from it in three ways that change every output: each block
has two extra depthwise convs (`dw1`, `dw2`), its post-norm is applied after the residual sum, and the
stem conv pads by 3. The attribute names below are SEEM's own, so the `backbone.*` tensors of
`seem_focalt_v0.pt` / `_v1.pt` load strictly with no renaming (docs/backbones.md §2).

Grayscale input under `protocol="study"` gets the official one-channel rebuild of the stem (`StudyGrayStem`,
docs/protocol.md §7, row 3), which keeps the pretrained R-channel kernel but loses the padding and the LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from extract.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    DataConfig,
    Features,
    count_parameters,
    single_channel_conv,
)
from extract.backbones.registry import register
from extract.backbones.weights import load_state_dict, load_strict, take_prefix

FOCAL_T = dict(embed_dim=96, depths=(2, 2, 6, 2), focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))


def depthwise(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


def apply_nchw(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A conv on a channels-last map."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvEmbed(nn.Module):
    """Pad right/bottom to a multiple of the stride, strided conv, LayerNorm (stem: k7 s4 p3; downsample: k3 s2 p1)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C'), channels last."""
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.stride, 0, -height % self.stride))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class StudyGrayStem(nn.Module):
    """The study's one-channel SEEM stem: the pretrained R-channel 7x7 kernel, stride 4, no padding, no LayerNorm.

    The official code (`defaults/models.py` with `PatchEmbed` of utils/transformers/focal_dw.py) rebuilds the stem
    as `PatchEmbed(in_chans=1, is_stem=True, patch_size=4, embed_dim=96)`, whose defaults are a plain 4x4
    stride-4 conv without padding and no norm, then assigns the 7x7 R-channel kernel and the bias to it: the
    conv runs the 7x7 kernel with stride 4 and no padding. The input is first padded right/bottom to a multiple
    of 4, as before. A 224 input gives a 55 x 55 map (SEEM's own stem: 56 x 56), and the last pixel row and
    column are never read; the later stages pad their odd maps and run unchanged (28, 14, 7).
    """

    def __init__(self, stem: ConvEmbed) -> None:
        super().__init__()
        self.stride = stem.stride
        self.proj = single_channel_conv(stem.proj, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, H', W', C), channels last, not normalised."""
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.stride, 0, -height % self.stride))
        return self.proj(x).permute(0, 2, 3, 1)


class FocalModulation(nn.Module):
    """q * h(sum of gated, increasingly wide depthwise contexts + a global one), averaged over the levels."""

    def __init__(self, dim: int, focal_level: int, focal_window: int) -> None:
        super().__init__()
        self.focal_level = focal_level
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        kernels = [focal_window + 2 * level for level in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU()) for k in kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        q, ctx, gates = self.f(x).permute(0, 3, 1, 2).split((dim, dim, self.focal_level + 1), 1)
        modulator = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            modulator = modulator + ctx * gates[:, level : level + 1]
        modulator = modulator + self.act(ctx.mean((2, 3), keepdim=True)) * gates[:, self.focal_level :]
        modulator = modulator / (self.focal_level + 1)  # SEEM's `scaling_modulator`
        return self.proj((q * self.h(modulator)).permute(0, 2, 3, 1))


class FocalBlock(nn.Module):
    """dw1 -> LN1(x + g1 * modulation(x)) -> dw2 -> LN2(x + g2 * mlp(x)): norms after the residual sums."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, mlp_ratio: float, drop_path: float, layerscale: float) -> None:
        super().__init__()
        self.dw1 = depthwise(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_level, focal_window)
        self.dw2 = depthwise(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((dim,), layerscale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layerscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + apply_nchw(self.dw1, x)
        x = self.norm1(x + self.drop_path(self.gamma_1 * self.modulation(x)))
        x = x + apply_nchw(self.dw2, x)
        return self.norm2(x + self.drop_path(self.gamma_2 * self.mlp(x)))


class FocalStage(nn.Module):
    """The blocks of one resolution; `downsample` (absent in the last stage) feeds the next stage."""

    def __init__(self, dim: int, depth: int, focal_level: int, focal_window: int, mlp_ratio: float,
                 drop_paths: Sequence[float], layerscale: float, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            FocalBlock(dim, focal_level, focal_window, mlp_ratio, rate, layerscale) for rate in drop_paths[:depth]
        )
        self.downsample = ConvEmbed(dim, 2 * dim, 3, 2, 1) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class FocalNetDW(nn.Module):
    """SEEM's Focal-T trunk: stem, four stages, and a LayerNorm per stage output (`norm0..norm3` -> res2..res5)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 focal_levels: Sequence[int] = (3, 3, 3, 3), focal_windows: Sequence[int] = (3, 3, 3, 3),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.3, layerscale: float = 1e-4) -> None:
        super().__init__()
        self.dims = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = ConvEmbed(in_chans, embed_dim, 7, 4, 3)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            FocalStage(dim, depth, level, window, mlp_ratio, rates[start:], layerscale, i < len(depths) - 1)
            for i, (dim, depth, level, window, start) in enumerate(zip(self.dims, depths, focal_levels, focal_windows, starts, strict=True))
        )
        for i, dim in enumerate(self.dims):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, last: int = -1) -> list[torch.Tensor]:
        """Normed outputs of stages 0..last (res2..), channels last; each stage's un-normed output feeds the next."""
        last = last % len(self.layers)
        h = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers[: last + 1]):
            h = stage(h)
            outs.append(getattr(self, f"norm{i}")(h))
            if i < last:
                h = stage.downsample(h.permute(0, 3, 1, 2))
        return outs


class SEEMBackbone(Backbone):
    """blocks = the four stages; pooled = spatial mean of a stage's normed map; tokens = that map (res5: 49 x 768)."""

    first_conv = "model.patch_embed.proj"

    def __init__(self, model: FocalNetDW, image_size: int, protocol: str = "medfm") -> None:
        super().__init__(DataConfig(image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear"), model.dims[-1], model.dims[-1], protocol)
        self.model = model

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.model.layers

    def use_one_channel(self) -> None:
        """The R-channel kernel in SEEM's own stem (medfm), or the study's rebuilt stem (`StudyGrayStem`)."""
        if self.protocol != "study":
            return super().use_one_channel()
        self.model.patch_embed = StudyGrayStem(self.model.patch_embed)
        # The stem is named, not its conv: an unpadded 7x7 stride-4 conv never covers a whole input, and the
        # patch-fit check (extract/inputs.py) would refuse every size the study ran at.
        self.first_conv = "model.patch_embed"
        self.in_chans = 1

    def forward_layers(self, x: torch.Tensor, layers: Sequence[int] = (-1,)) -> dict[int, Features]:
        wanted = self.resolve_layers(layers)
        maps = self.model(x, last=wanted[-1])
        return {i: Features(maps[i].mean((1, 2)), maps[i].flatten(1, 2)) for i in wanted}


def seem_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a SEEM / X-Decoder checkpoint (`backbone.*`, prefix stripped), or a bare backbone file."""
    state_dict = load_state_dict(path)
    return take_prefix(state_dict, "backbone.") if any(k.startswith("backbone.") for k in state_dict) else state_dict


def build(weights: Path | None, *, image_size: int | None = None, protocol: str = "medfm", **overrides: Any) -> Backbone:
    model = FocalNetDW(**{**FOCAL_T, **overrides})
    if weights is not None:
        load_strict(model, seem_state_dict(weights), weights, "SEEM's Focal-T (focal_dw) backbone")
    return SEEMBackbone(model, image_size or 224, protocol)


def count_params() -> int:
    with torch.device("meta"):
        return count_parameters(FocalNetDW(**FOCAL_T))


register(BackboneSpec(
    name="seem", study_row="SEEM Focal-T, COCO+LVIS", family="seem", build=build,
    weights_file="seem_focalt_v0.pt",
    weights_url="https://huggingface.co/xdecoder/SEEM/resolve/main/seem_focalt_v0.pt",
    hub_files=(("xdecoder/SEEM", "seem_focalt_v0.pt"),),
    pooled_dim=768, token_shape=(49, 768), count_params=count_params,
    notes="pooled: mean of res5; tokens: res5 7x7 map; res2..res5 via --layers 0..3",
))
