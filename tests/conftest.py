"""Shared test set-up: offline, deterministic, small thread counts, outputs in a temp folder."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
# rich fixes a console's width from COLUMNS when the console is made (some at import): without it, a width is read when
# printing, so the tests that set COLUMNS get theirs; pytest-xdist's workers inherit COLUMNS=80 from their start
os.environ.pop("COLUMNS", None)

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: more threads only spin
torch.use_deterministic_algorithms(True, warn_only=True)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def isolated_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes under its own MEDFM_OUTPUT and sees no weights folder."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("MEDFM_OUTPUT", str(out))
    monkeypatch.delenv("MEDFM_WEIGHTS_DIR", raising=False)
    return out


@pytest.fixture(autouse=True)
def said_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the code says once per process (a library backbone's features, an image cache it cannot check) is said once
    per test, so a test's output does not depend on which tests ran before it in its process."""
    monkeypatch.setattr("extract.backbones.library._SAID", set())
    monkeypatch.setattr("extract.image_cache._UNRECORDED", set())


def cli(name: str) -> str:
    """Path of an installed console script (`extract`, `probe`, `cache`, `finetune`)."""
    return str(BIN / name)


def tool(name: str) -> str:
    """A system tool's path (chromium, pdflatex); without it the test skips, except in CI (CI set), where `make
    test-tools` installed it."""
    found = shutil.which(name)
    if found is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"needs {name}: `make test-tools` (as root) installs it")
    return str(found)
