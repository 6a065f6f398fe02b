"""The newcomer's question on their own folder, with the newcomer's commands and the defaults: two backbones, each fed
its own way (deit resizes bicubic, ResNet-152 bilinear), one report column with a gain and an average."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from extract.cli import main as extract_main
from probe.cli import main as probe_main
from tests.tiny import TINY_RESNET, TINY_VIT, run_main


def folder(root: Path, per_class: int = 12) -> None:
    """Two classes a tiny random backbone can tell apart: dark and bright noise."""
    rng = np.random.default_rng(0)
    for name, level in (("dark", 60), ("bright", 190)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(level, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def overrides(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--override", f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")]


@pytest.mark.slow  # two extractions and two probes through the commands
def test_two_backbones_on_one_folder_with_defaults_share_one_column_with_a_gain(tmp_path: Path, monkeypatch) -> None:
    folder(tmp_path / "data")
    for backbone, tiny in (("deit", TINY_VIT), ("resnet152", TINY_RESNET)):
        code, _, err = run_main(extract_main, ["run", "--backbone", backbone, "--dataset", "imagefolder", "--root", str(tmp_path / "data"),
                                               "--weights", "random", "--image-size", "64", *overrides(tiny)], monkeypatch)
        assert code == 0, err
        code, _, err = run_main(probe_main, ["run", "--backbone", backbone, "--dataset", "imagefolder"], monkeypatch)
        assert code == 0, err
    code, out, err = run_main(probe_main, ["report", "--out", str(tmp_path / "reports")], monkeypatch)
    assert code == 0, err
    csv = pd.read_csv(next((tmp_path / "reports").rglob("*.csv")))
    score_columns = [c for c in csv.columns if c.startswith("imagefolder") and c.endswith(")") and " n" not in c]
    assert len(score_columns) == 1, list(csv.columns)  # one dataset, however each backbone resized it
    resnet = csv[csv["backbone"] == "resnet152"].iloc[0]
    assert np.isfinite(resnet["gain vs deit linear (%)"]) and np.isfinite(resnet["average"])
    assert "bilinear resize" in resnet["inputs"] and "bicubic resize" in csv[csv["backbone"] == "deit"].iloc[0]["inputs"]
    assert pd.isna(resnet["inputs_differ"]) or resnet["inputs_differ"] == ""  # their own pipelines: no mark
