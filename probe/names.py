"""The names in the head registry, known without importing torch.

`probe run`, `probe sweep` and `finetune run` check `--head` against these before any model code loads;
`tests/probe/test_cli.py` checks that they equal the registry (`probe.heads`); a new head goes in both.
"""

from __future__ import annotations

import sys

from common.registry import unknown

HEADS = ("linear", "deit", "knn", "zeroshot")


def check_head(name: str) -> None:
    """An unknown head is the registry's own error (`probe.heads.get_head`), said without loading it (where the registry
    is loaded already, heads registered at run time count too)."""
    registry = sys.modules.get("probe.heads")
    names = tuple(spec.name for spec in registry.list_heads()) if registry is not None else HEADS
    if name not in names:
        raise unknown("head", name, names)
