"""What every backbone is: a module that returns pooled features and tokens, block by block."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from cache.schema import PROTOCOLS, resolve_layer  # noqa: F401  (PROTOCOLS re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
class Features(NamedTuple):
    """pooled: [B, Dp], the linear head's input; tokens: [B, T, Dt], the DeiT head's input."""

    pooled: torch.Tensor
    tokens: torch.Tensor


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a backbone (timm's data config, reduced to what we use)."""

    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"


class Backbone(nn.Module):
    """A feature extractor run as stem -> blocks -> readout.

    Subclasses set `blocks` (ordered stages; partial unfreezing trains the last K) and implement
    `stem` and `readout`; `forward_layers` then gives the features of any blocks from one pass.
    A family whose stages do not chain this simply (e.g. outputs taken before a downsample)
    overrides `forward_layers`. `protocol` ("medfm" or "study") says whose behaviour the family follows
    where medfm departs from the official code (docs/protocol.md §7); most families ignore it.
    """

    blocks: nn.ModuleList
    first_conv: str  # path of the input convolution (timm's `first_conv`), rebuilt for one-channel input

    def __init__(self, data_config: DataConfig, pooled_dim: int, token_dim: int, protocol: str = "medfm") -> None:
        super().__init__()
        self.data_config = data_config
        self.pooled_dim = pooled_dim
        self.token_dim = token_dim
        self.in_chans = 3
        self.protocol = protocol  # checked where it enters: the command lines and `create_backbone`

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, h: torch.Tensor, index: int) -> Features:
        """Features from the output `h` of block `index`."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Turn -1-style indices into sorted block indices (the rule of `cache.schema.resolve_layer`)."""
        return sorted({resolve_layer(i, self.num_layers) for i in layers})

    def forward_layers(self, x: torch.Tensor, layers: Sequence[int] = (-1,)) -> dict[int, Features]:
        """Features of each requested block (non-negative index -> Features) from one forward pass."""
        wanted = self.resolve_layers(layers)
        h = self.stem(x)
        out: dict[int, Features] = {}
        for i, block in enumerate(self.blocks[: wanted[-1] + 1]):
            h = block(h)
            if i in wanted:
                out[i] = self.readout(h, i)
        return out

    def forward(self, x: torch.Tensor) -> Features:
        return self.forward_layers(x, (-1,))[self.num_layers - 1]

    def token_shape(self) -> tuple[int, int]:
        """(T, Dt) at the configured input size, from a forward on zeros."""
        size = self.data_config.input_size
        chans = self.in_chans
        with torch.inference_mode():
            feats = self(torch.zeros(1, chans, size, size, device=next(self.parameters()).device))
        return tuple(feats.tokens.shape[1:])  # type: ignore[return-value]

    def use_one_channel(self) -> None:
        """Take grayscale input: the first conv keeps only its pretrained R-channel kernel (the study's recipe)."""
        parent, _, name = self.first_conv.rpartition(".")
        owner = self.get_submodule(parent) if parent else self
        setattr(owner, name, single_channel_conv(getattr(owner, name)))
        self.in_chans = 1


Builder = Callable[..., Backbone]
"""builder(weights_path_or_None, image_size=..., protocol="medfm", **overrides) -> Backbone (three input channels; see
`use_one_channel`). Every builder takes `protocol`; a family with nothing to switch ignores it."""


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: everything the CLI, the fingerprint and `extract backbones` need to know."""

    name: str
    study_row: str
    family: str
    build: Builder
    weights_file: str  # the official file name, looked up in MEDFM_WEIGHTS_DIR
    weights_url: str  # where a user downloads it
    hub_files: tuple[tuple[str, str], ...] = ()  # (repo_id, filename) tried in the HF hub cache
    pooled_dim: int = 768
    token_shape: tuple[int, int] = (196, 768)
    count_params: Callable[[], int] | None = None  # the study's way; default: the built model's params
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


WeightsPath = Path | None


def single_channel_conv(conv: nn.Conv2d, padding: Any = None) -> nn.Conv2d:
    """A 1-channel copy of a pretrained first conv that keeps only the R-channel kernel (the study's recipe).

    `padding` replaces the conv's own (None: keep it)."""
    new = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding if padding is None else padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, :1])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
