"""The backbones: `create_backbone(name, weights)` builds any registered model (`extract.backbones.registry`).

Each family module registers its entries on import; nothing outside a family module knows anything family-specific.
`by_name` registers the library resolvers: `timm:NAME`, `open_clip:ARCH[@PRETRAINED]` and `hf:MODEL` need no entry;
`named` registers the 2025 and medical rows, built by those resolvers' adapters.
"""

from __future__ import annotations

from extract.backbones import blip, by_name, openclip, sam, seem, timm_family  # noqa: F401 - the families register themselves

# isort: split
from extract.backbones import named  # noqa: F401 - the later rows, registered after the study's eight
from extract.backbones.base import PROTOCOLS, Backbone, BackboneSpec, DataConfig, Features
from extract.backbones.registry import REGISTRY, create_backbone, get_spec, list_backbones, register

__all__ = ["PROTOCOLS", "REGISTRY", "Backbone", "BackboneSpec", "DataConfig", "Features", "create_backbone", "get_spec",
           "list_backbones", "register"]
