"""Tiny extractions shared by the extraction, fault and transfer tests: a tiny `ExtractConfig`, the `extract` entry
point in-process with a one-block DeiT, and the one-error-line check of a failed command."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from extract.backbones import REGISTRY as backbone_registry
from extract.backbones import get_spec
from extract.cli import main
from extract.runner import ExtractConfig
from tests.tiny import TINY_SIZE, TINY_VIT, TINY_VIT_1, run_main


def config(out: Path, **kw) -> ExtractConfig:
    """A tiny extraction with two augmented train views, so resume, shards and torchrun cover the views too."""
    base = dict(backbone="deit", dataset="demo", weights="random", out=out, batch_size=8, image_size=TINY_SIZE,
                workers=0, overrides=TINY_VIT, dataset_options={"per_class": 10}, views=2, augment="study")
    base.update(kw)
    return ExtractConfig(**base)


def error_line(code: int, stderr: str) -> str:
    """The run failed with exit 2 and exactly one `error:` line, the last thing it printed; no traceback."""
    assert code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in stderr, stderr
    return errors[0]


def invoke(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The `extract` entry point in-process, with a one-block DeiT registered as `tiny-deit` for this test only."""
    deit = get_spec("deit")
    monkeypatch.setitem(backbone_registry.entries, "tiny-deit", dataclasses.replace(deit, name="tiny-deit", build=functools.partial(deit.build, **TINY_VIT_1)))
    return run_main(main, args, monkeypatch)
