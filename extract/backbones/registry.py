"""The backbone registry: every family module registers its entries here, and `create_backbone` builds any of them.

A name with a library prefix (`timm:`, `open_clip:`, `hf:`; `extract.names.LIBRARIES`) has no entry: the library's
resolver (`register_library`, called by `extract/backbones/by_name.py`) makes its spec when it is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cache.schema import check_protocol
from common.errors import MedfmError
from common.registry import Registry
from extract.backbones.base import Backbone, BackboneSpec
from extract.backbones.weights import ResolvedWeights, resolve_weights
from extract.names import parse_library_name

RANDOM_INIT_SEED = 0
REGISTRY: Registry[BackboneSpec] = Registry("backbone", "extract backbones")
LIBRARY_RESOLVERS: dict[str, Callable[[str], BackboneSpec]] = {}  # prefix -> resolve(name) -> spec
_RESOLVED: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    return REGISTRY.register(spec.name, spec)


def register_library(prefix: str, resolve: Callable[[str], BackboneSpec]) -> None:
    """`resolve(name)` makes the spec of any `prefix:...` name (or raises a one-line MedfmError)."""
    if prefix in LIBRARY_RESOLVERS:
        raise ValueError(f"backbone library {prefix} registered twice")
    LIBRARY_RESOLVERS[prefix] = resolve


def get_spec(name: str) -> BackboneSpec:
    """The registry's entry, or the spec a library resolver makes for `timm:NAME` & co. (made once per process)."""
    parsed = parse_library_name(name)
    if parsed is None:
        return REGISTRY.get(name)
    if name not in _RESOLVED:
        _RESOLVED[name] = LIBRARY_RESOLVERS[parsed.library](name)
    return _RESOLVED[name]


def list_backbones() -> list[BackboneSpec]:
    return REGISTRY.values()


def create_backbone(
    name: str,
    weights: str | ResolvedWeights = "default",
    *,
    image_size: int | None = None,
    in_chans: int = 3,
    protocol: str = "medfm",
    **overrides: Any,
) -> Backbone:
    """Build backbone `name` with `weights` (`default` | `random` | `auto` | PATH, or resolved ones), in eval mode.

    `image_size` changes the input resolution (position embeddings are resampled); `in_chans=1`
    rebuilds the first conv from the pretrained R-channel kernel (the study's grayscale recipe);
    `protocol="study"` makes the families follow the official code where medfm departs from it
    (docs/protocol.md §7): BLIP's pooled token, SEEM's one-channel stem, SAM's relative-position resize,
    OpenCLIP's tokens and DINOv2's position embedding. `overrides` reach the family's constructor, so
    tests build tiny instances of the same code path.
    """
    check_protocol(protocol)
    spec = get_spec(name)
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(spec, weights)
    # Random weights are seeded: the same settings give the same model in every process, so a resumed
    # or repeated extraction with `--weights random` stays consistent with its fingerprint.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + resolved.seed)  # `--weights random:SEED`: another draw, a null backbone
        model = spec.build(resolved.path, image_size=image_size, protocol=protocol, **overrides)
    if in_chans == 1:
        model.use_one_channel()
    elif in_chans != 3:
        raise MedfmError(f"in_chans must be 1 (grayscale) or 3, got {in_chans}")
    model.weights = resolved
    return model.eval()
