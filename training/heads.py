"""Classification heads and their registry, shared by probe (on cached features) and finetune (on a live backbone).

A head is registered as a `HeadSpec`, as a backbone is: its name, the cache feature it reads (`pooled` or
`tokens`), how to build it from that feature's row shape, the options it takes and what it starts from.
probe and finetune build heads only through the registry.

`LinearHead` is the study's linear probe on the pooled feature. `DeiTHead` is the study's appended
"DeiT classifier" (docs/protocol.md §4): each token -> Linear(d -> width) + LayerNorm -> DeiT blocks with their
own CLS token and bicubically interpolated position embedding -> final norm -> CLS -> Linear.
The DeiT blocks come from timm and start from the supervised ImageNet weights when the file is on
this machine; without it they start random, with a visible warning and `random_init = True`.
Under `protocol="study"` the DeiT head keeps DeiT's native 14 x 14 position table as its parameter and
interpolates it at every forward, as the official deit.py does (docs/protocol.md §7, row 8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cache.schema import check_protocol
from common.checkpoints import WEIGHTS_DIR_ENV, find_weights, load_state_dict
from common.errors import MedfmError
from common.registry import Registry


@dataclass(frozen=True)
class DeiTPreset:
    """One DeiT width: the timm model and where its official weights may sit on this machine."""

    timm_name: str
    width: int
    weights_file: str  # the official file name, looked up in MEDFM_WEIGHTS_DIR

    @property
    def hub_repo(self) -> str:
        return "timm/" + self.timm_name


PRESETS = {
    "deit-b": DeiTPreset("deit_base_patch16_224.fb_in1k", 768, "deit_base_patch16_224-b5f2ef4d.pth"),
    "deit-s": DeiTPreset("deit_small_patch16_224.fb_in1k", 384, "deit_small_patch16_224-cd65a155.pth"),
    "deit-t": DeiTPreset("deit_tiny_patch16_224.fb_in1k", 192, "deit_tiny_patch16_224-a1311bcf.pth"),
}
RANDOM_DEIT_WARNING = "DeiT head weights not found"


class LinearHead(nn.Module):
    """A linear layer on the pooled feature [B, D] (the study's frozen/unfrozen + linear scenarios).

    `shift` and `scale` (buffers; identity unless `standardize` sets them) optionally standardize the
    feature first, as MAE's linear probe does; they travel with the head's state dict.
    """

    def __init__(self, in_dim: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_outputs)
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    def standardize(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Feed the linear layer (x - mean) / std; dimensions with no spread are left unscaled."""
        self.shift.copy_(mean)
        self.scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.shift) / self.scale)


class DeiTHead(nn.Module):
    """DeiT blocks on backbone tokens [B, T, D] -> logits [B, num_outputs].

    `grid` (rows, cols) fixes the token grid at build time (the position embedding is resampled once);
    without it the embedding is resampled per forward to the square grid of T tokens.
    `weights`: "default" (the official file when present, else random with a warning), "random", or a path.
    `protocol="study"`: the parameter is always DeiT's native table (14 x 14 + CLS), interpolated to the token
    grid at every forward by `deit_interpolate_pos_encoding` (bicubic, no antialias), so gradients train the
    14 x 14 table; the grid must then be square. "medfm" (the default) resamples once (bicubic, antialias).
    """

    def __init__(
        self, in_dim: int, num_outputs: int, *, depth: int = 12, preset: str = "deit-b",
        weights: str = "default", grid: tuple[int, int] | None = None, protocol: str = "medfm",
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise MedfmError(f"unknown DeiT head preset '{preset}'; choose one of {', '.join(PRESETS)}")
        if not 1 <= depth <= 12:
            raise MedfmError(f"DeiT head depth must be between 1 and 12, got {depth}")
        spec = PRESETS[preset]
        vit, self.weights_source = _create_deit(spec, depth, weights)
        self.random_init = self.weights_source == "random"
        self.project = nn.Sequential(nn.Linear(in_dim, spec.width), nn.LayerNorm(spec.width))
        self.cls_token = vit.cls_token
        self.native_grid = tuple(vit.patch_embed.grid_size)
        self.grid = tuple(grid) if grid is not None else None
        self.protocol = protocol
        if protocol == "study" and self.grid is not None and self.grid[0] != self.grid[1]:
            raise MedfmError(f"the study's DeiT head interpolates its table to square grids only, not {self.grid[0]}x{self.grid[1]}")
        pos_embed = vit.pos_embed.data
        from timm.layers import resample_abs_pos_embed  # timm (and torchvision) take seconds to import: DeiT heads only

        if protocol == "medfm" and self.grid is not None and self.grid != self.native_grid:
            pos_embed = resample_abs_pos_embed(pos_embed, new_size=list(self.grid), old_size=list(self.native_grid), num_prefix_tokens=1)
        self.pos_embed = nn.Parameter(pos_embed.clone())
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.classifier = nn.Linear(spec.width, num_outputs)

    def position_embedding(self, num_tokens: int) -> torch.Tensor:
        """The embedding for CLS + `num_tokens` tokens, resampled bicubically when the grid differs."""
        if self.protocol == "study":
            if self.grid is not None and num_tokens != self.grid[0] * self.grid[1]:
                raise MedfmError(f"DeiT head got {num_tokens} tokens but its grid is {self.grid[0]}x{self.grid[1]}")
            return deit_interpolate_pos_encoding(self.pos_embed, num_tokens)
        grid = self.grid or self.native_grid
        if num_tokens == grid[0] * grid[1]:
            return self.pos_embed
        side = math.isqrt(num_tokens)
        if self.grid is not None or side * side != num_tokens:
            raise MedfmError(f"DeiT head got {num_tokens} tokens but its grid is {grid[0]}x{grid[1]}; build it with grid=(rows, cols) of the tokens")
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, new_size=[side, side], old_size=list(self.native_grid), num_prefix_tokens=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.project(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(tokens.shape[1])
        x = self.norm(self.blocks(x))
        return self.classifier(x[:, 0])


def deit_interpolate_pos_encoding(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The official deit.py `interpolate_pos_encoding`: the native table (CLS + N patches) for CLS + `num_tokens`.

    Unchanged when `num_tokens` is N; else the N-patch square is resized bicubically by the single scale factor
    sqrt(num_tokens / N), `align_corners=False`, `recompute_scale_factor=False`, no antialias.
    """
    patches = pos_embed.shape[1] - 1
    if num_tokens == patches:
        return pos_embed
    side, out = math.isqrt(patches), math.isqrt(num_tokens)
    if out * out != num_tokens:
        raise MedfmError(f"the study's DeiT head needs a square token grid, got {num_tokens} tokens")
    dim = pos_embed.shape[-1]
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), scale_factor=math.sqrt(num_tokens / patches),
                         mode="bicubic", align_corners=False, recompute_scale_factor=False)
    if grid.shape[-1] != out:  # a floating-point slip in the output size; the official code would fail on it too
        raise MedfmError(f"DeiT head position table resized to {grid.shape[-1]}x{grid.shape[-1]}, not {out}x{out}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, num_tokens, dim)], dim=1)


def find_deit_weights(spec: DeiTPreset) -> Path | None:
    """The official DeiT file in MEDFM_WEIGHTS_DIR, else timm's file in the HF hub cache; no download."""
    return find_weights(spec.weights_file, [(spec.hub_repo, "model.safetensors")])


def deit_weights_identity(preset: str, weights: str) -> str:
    """What a DeiT head will start from, without building it: "random" or the weights file's name."""
    if weights == "random":
        return "random"
    path = find_deit_weights(PRESETS[preset]) if weights == "default" and preset in PRESETS else Path(weights)
    return path.name if path is not None else "random"


def _create_deit(spec: DeiTPreset, depth: int, weights: str) -> tuple[nn.Module, str]:
    """The timm DeiT with `depth` blocks and where its weights came from ("random" or the file path)."""
    import timm
    path: Path | None = None
    if weights == "default":
        path = find_deit_weights(spec)
        if path is None:
            message = (f"{RANDOM_DEIT_WARNING} ({spec.weights_file} in ${WEIGHTS_DIR_ENV}, or {spec.hub_repo} in the "
                       "hub cache): its blocks start from RANDOM weights, unlike the study")
            warnings.warn(message, stacklevel=3)
    elif weights != "random":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MedfmError(f"DeiT head weights file {path} does not exist; pass default, random or an existing path")
    kwargs: dict[str, Any] = {"num_classes": 0, "depth": depth, "drop_path_rate": 0.0}
    if path is None:
        return timm.create_model(spec.timm_name, pretrained=False, **kwargs), "random"
    state = {k: v for k, v in load_state_dict(path).items() if _within_depth(k, depth)}
    model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)
    return model, str(path)


def _within_depth(key: str, depth: int) -> bool:
    """Keep a checkpoint key unless it belongs to a block the truncated head does not have."""
    parts = key.split(".")
    return not (parts[0] == "blocks" and int(parts[1]) >= depth)


@dataclass(frozen=True)
class HeadSpec:
    """A registry entry: what a head reads from a cache and how it is built.

    `build(row_shape, num_outputs, *, protocol="medfm", **options)`: `row_shape` is one row of the feature it reads
    ([D] pooled, [T, D] tokens). `protocol` ("medfm" or "study", `training.recipe.PROTOCOLS`) is taken by every
    builder; a head with nothing to switch ignores it. `options` are the head's own settings (TrainConfig's
    `head_<option>` fields).
    `init(**options)` says what its weights start from without building it: "" when nothing is pretrained
    (a linear layer), "random" when pretrained weights were wanted but are missing or refused, else the file.
    `fit(config, source, task, device, progress) -> probe.train.FitResult`: set for a head without a training loop
    (the kNN probe, `probe.knn`, and zero-shot, `probe.zeroshot`, which register themselves with `fit_only` builders);
    `probe run` calls it instead of `probe.train.train_head`, `probe sweep` refuses such a head, and its `build` refuses
    (there is no module to build or finetune).
    """

    name: str
    reads: str  # the cache feature kind: pooled | tokens
    build: Callable[..., nn.Module]
    options: tuple[str, ...] = ()
    init: Callable[..., str] = lambda **options: ""
    description: str = ""
    fit: Callable[..., Any] | None = None

    @property
    def trains(self) -> bool:
        """Whether the head is a module trained by gradient descent (`probe.train.fit`), not a fit of its own."""
        return self.fit is None


REGISTRY: Registry[HeadSpec] = Registry("head")


def register_head(spec: HeadSpec) -> HeadSpec:
    return REGISTRY.register(spec.name, spec)


def get_head(name: str) -> HeadSpec:
    return REGISTRY.get(name)


def list_heads() -> list[HeadSpec]:
    return REGISTRY.values()


def build_head(name: str, row_shape: tuple[int, ...], num_outputs: int, protocol: str = "medfm", **options: Any) -> nn.Module:
    """The head `name` for features of `row_shape`, with its own `options` (see `HeadSpec`), under `protocol`."""
    check_protocol(protocol)
    return get_head(name).build(tuple(row_shape), num_outputs, protocol=protocol, **options)


def _build_linear(row_shape: tuple[int, ...], num_outputs: int, *, protocol: str = "medfm") -> LinearHead:
    """A linear layer on the pooled feature; the same under both protocols."""
    return LinearHead(row_shape[-1], num_outputs)


def _build_deit(row_shape: tuple[int, ...], num_outputs: int, *, protocol: str = "medfm", **options: Any) -> DeiTHead:
    """A DeiT head for the square grid of the tokens, when they form one: its position embedding is resampled once
    to that grid ("medfm") or interpolated to it at every forward ("study")."""
    side = math.isqrt(row_shape[0])
    grid = (side, side) if side * side == row_shape[0] else None
    return DeiTHead(row_shape[-1], num_outputs, grid=grid, protocol=protocol, **options)


register_head(HeadSpec(
    name="linear", reads="pooled", build=_build_linear,
    description="a linear layer on the pooled feature (the study's linear scenarios)",
))
register_head(HeadSpec(
    name="deit", reads="tokens", build=_build_deit, options=("depth", "preset", "weights"),
    init=lambda depth=12, preset="deit-b", weights="default": deit_weights_identity(preset, weights),
    description="DeiT blocks on the tokens, ImageNet-initialised (the study's appended DeiT classifier)",
))


def fit_only(name: str) -> Callable[..., nn.Module]:
    """The builder of a head that has a fit of its own and no module (kNN, zero-shot): it refuses, in one line."""

    def build(row_shape: tuple[int, ...], num_outputs: int, *, protocol: str = "medfm") -> nn.Module:
        raise MedfmError(f"the {name} head has no module to build or finetune: use it on cached features, `probe run --head {name}`")

    return build
