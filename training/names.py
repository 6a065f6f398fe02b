"""The names in the head registry, known without importing torch.

`probe run`, `probe sweep` and `finetune run` check `--head` against these before any model code loads;
`tests/probe/test_cli.py` checks that they equal the registry (`training.heads`); a new head goes in both.
"""

from __future__ import annotations

import sys

from common.errors import MedfmError
from common.registry import unknown

MODULE_HEADS = ("linear", "deit")  # modules both stages build and train (`training.heads`)
FIT_HEADS = ("knn", "zeroshot")  # a fit of their own on cached features, registered by `probe.knn` and `probe.zeroshot`
HEADS = MODULE_HEADS + FIT_HEADS


def check_head(name: str, module: bool = False) -> None:
    """An unknown head is the registry's own error (`training.heads.get_head`), said without loading it (where the registry
    is loaded already, heads registered at run time count too). `module`: the head must be one a stage can build and
    train end to end (finetune), not a fit on cached features."""
    registry = sys.modules.get("training.heads")
    names = tuple(spec.name for spec in registry.list_heads()) if registry is not None else ()
    names = tuple(dict.fromkeys(HEADS + names))
    if name not in names:
        raise unknown("head", name, names)
    if module and name in FIT_HEADS:
        raise MedfmError(f"the {name} head has no module to build or finetune: use it on cached features, `probe run --head {name}`")
