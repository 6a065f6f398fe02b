"""The backbones: `create_backbone(name, weights)` builds any registered model (`extract.backbones.registry`).

Each family module registers its entries on import; nothing outside a family module knows anything family-specific.
`by_name` registers the library resolvers: `timm:NAME`, `open_clip:ARCH[@PRETRAINED]` and `hf:MODEL` need no entry.
"""

from __future__ import annotations

from extract.backbones import blip, by_name, openclip, sam, seem, timm_family  # noqa: F401 - the families register themselves
from extract.backbones.base import PROTOCOLS, Backbone, BackboneSpec, DataConfig, Features
from extract.backbones.registry import REGISTRY, create_backbone, get_spec, list_backbones, register

__all__ = ["PROTOCOLS", "REGISTRY", "Backbone", "BackboneSpec", "DataConfig", "Features", "create_backbone", "get_spec",
           "list_backbones", "register"]
