"""The head registry as probe sees it: training's heads (linear, DeiT; `training.heads`) and the two heads with a fit
of their own on cached features that probe adds to it (kNN, `probe.knn`; zero-shot, `probe.zeroshot`), registered on
import of this module. Every probe module asks for heads here, so the registry it reads is always whole."""

from __future__ import annotations

from probe import knn, zeroshot  # noqa: F401 - importing them registers the kNN and zero-shot heads
from training.heads import RANDOM_DEIT_WARNING, HeadSpec, get_head, list_heads

__all__ = ["RANDOM_DEIT_WARNING", "HeadSpec", "get_head", "list_heads"]
