"""Tiny instances of the real code paths, shared by every test: model settings, tasks, and a fast CLI runner.

Every backbone is built through `create_backbone` with constructor overrides that shrink it; every
cache meta and task is the typed contract of `cache.schema`, as `extract run` writes it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task

if TYPE_CHECKING:
    from finetune.train import FinetuneConfig

TINY_SIZE = 32
TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)  # the timm ViT family: deit, dino, dinov2, blip
TINY_VIT_1 = dict(embed_dim=32, depth=1, num_heads=2)  # one block: the fastest ViT, for pipeline tests
TINY_VIT_DEEP = dict(embed_dim=32, depth=3, num_heads=2, patch_size=8)  # three blocks (partial unfreezing) at 32 px
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))
TINY_SAM = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2)
# name -> (constructor overrides, input size, pooled dim, token shape): one tiny instance of every backbone
TINY_BACKBONES: dict[str, tuple[dict, int, int, tuple[int, int]]] = {
    "sam": (TINY_SAM, 64, 32, (16, 32)),
    "seem": (dict(embed_dim=8, depths=(1, 1, 1, 1)), 64, 64, (4, 64)),
    "dinov2": (TINY_VIT, 56, 32, (16, 32)),
    "openclip": (dict(embed_dim=16, width=32, layers=2, head_width=16), 64, 16, (16, 32)),
    "blip": (TINY_VIT, 64, 32, (16, 32)),
    "deit": (TINY_VIT, 64, 32, (16, 32)),
    "dino": (TINY_VIT, 64, 32, (16, 32)),
    "resnet152": (TINY_RESNET, 64, 256, (4, 256)),
}

MULTICLASS = Task("multiclass", ("a", "b", "c", "d"), "accuracy")
BINARY = Task("binary", ("normal", "abnormal"), "roc_auc")
MULTILABEL = Task("multilabel", ("x", "y", "z"), "mean_roc_auc")

QUIET = Console(file=io.StringIO())


def run_main(main: Callable[[], None], args: Sequence[str], monkeypatch) -> tuple[int, str, str]:
    """A console script's `main` run in this process, as the shell would run it: (exit code, stdout, stderr).

    In-process costs milliseconds where a subprocess pays seconds of imports; one subprocess test per
    command keeps the installed entry point itself covered.
    """
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.argv", ["prog", *args])
    code = 0
    # Python's default filters ignore ResourceWarning, so the installed command never prints one; pytest shows them, and
    # an object another test left unclosed, collected during this call, would print a `warning:` line here
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            main()
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()

META = CacheMeta(BackboneInfo("deit"), DatasetInfo("demo"), MULTICLASS, layers=(0,), num_layers=1)  # a cache's meta, minimal
# segment_anything's own ImageEncoderViT needs these spelled out to build the reference of TINY_SAM
TINY_SAM_REFERENCE = dict(TINY_SAM, patch_size=16, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=True)


def tiny_finetune(out: Path, **changes) -> FinetuneConfig:
    """A tiny ViT finetuned on 32 demo images (19 train) at 32 px: the real code path in about a second per epoch."""
    from finetune.train import FinetuneConfig  # on use: most tests never finetune

    cfg = FinetuneConfig(
        backbone="deit", dataset="demo", weights="random", image_size=32, batch_size=4, lr=5e-4, warmup_steps=2,
        epochs=3, workers=0, augment=False, head_depth=1, head_preset="deit-t", head_weights="random",
        dataset_options={"per_class": 8}, overrides=TINY_VIT_DEEP, out=out, device="cpu",
    )
    return replace(cfg, **changes)
