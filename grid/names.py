"""The grid's backbone names: any name a stage takes, plus the study's set words, so `--backbones study,2025` asks the
study's question of the later models in one grid (docs/grid.md §1).

A name is a registry row (`extract backbones`), a library name (`timm:NAME[.TAG]`, `open_clip:ARCH[@PRETRAINED]`,
`hf:MODEL`) or a set word of `common.study.BACKBONE_SETS` (study, 2025, medical), which stands for its rows. Sets are
expanded when the grid's spec is made, so its folder, jobs and `grid status` only ever hold real backbone names.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import MedfmError
from common.study import BACKBONE_SETS
from extract.names import BACKBONES, LIBRARIES, check_backbone, nearest


def expand_backbones(names: Iterable[str]) -> tuple[str, ...]:
    """Set words replaced by their rows, each backbone once, in the order first named: `("study", "deit", "2025")` is the
    study's eight then the 2025 set, `deit` not repeated."""
    return tuple(dict.fromkeys(row for name in names for row in BACKBONE_SETS.get(name, (name,))))


def check_backbones(names: Iterable[str]) -> None:
    """Every name a stage would take; an unknown one is one line naming the nearest rows and sets, and the other forms.
    A library name's own check already names the library's nearest models (`extract.names.check_library_name`)."""
    for name in names:
        try:
            check_backbone(name)
        except MedfmError:
            if ":" in name:
                raise
            raise MedfmError(f"unknown backbone '{name}'{nearest(name, (*BACKBONES, *BACKBONE_SETS))}; --backbones takes registry "
                             f"rows (`extract backbones`), the sets {', '.join(BACKBONE_SETS)}, or library models "
                             f"{', '.join(LIBRARIES.values())}") from None
