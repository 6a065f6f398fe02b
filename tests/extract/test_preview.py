"""`extract preview`: a montage of a dataset's images per class as a backbone sees them, one row per class."""

from __future__ import annotations

import dataclasses
import sys

from PIL import Image

from extract.backbones import REGISTRY as BACKBONES
from extract.backbones import DataConfig, get_spec
from extract.backbones.base import CLIP_MEAN, CLIP_STD
from extract.cli import main
from extract.preview import DPI, figure_inches
from tests.extract.extractions import error_line
from tests.predict.images import CLASSES, write_folder
from tests.tiny import TINY_VIT_1, run_main


def test_a_folder_dataset_gives_one_row_per_class_of_the_asked_images(tmp_path, isolated_outputs, monkeypatch):
    root = write_folder(tmp_path / "scans")
    code, out, err = run_main(main, ["preview", "--dataset", "imagefolder", "--root", str(root), "--per-class", "2"], monkeypatch)
    assert code == 0, err
    png = isolated_outputs / "previews" / "imagefolder.png"
    assert f"wrote {png} (3 classes x 2 images, 224 px)" in " ".join(out.split())  # the default input policy: 224 px
    width, height = figure_inches(len(CLASSES), 2)
    assert Image.open(png).size == (round(width * DPI), round(height * DPI))


def sized(build, **kwargs):
    """A tiny DeiT whose data config asks for 48 px inputs, bilinear, CLIP's statistics."""
    model = build(*kwargs.pop("args"), **kwargs, **TINY_VIT_1)
    model.data_config = DataConfig(48, CLIP_MEAN, CLIP_STD, "bilinear")
    return model


def test_a_backbone_shows_its_own_eval_transform(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "scans")
    deit = get_spec("deit")
    monkeypatch.setitem(BACKBONES.entries, "tiny-48", dataclasses.replace(deit, name="tiny-48",
                                                                          build=lambda *args, **kw: sized(deit.build, args=args, **kw)))
    png = tmp_path / "seen.png"
    code, out, err = run_main(main, ["preview", "--dataset", "imagefolder", "--root", str(root), "--backbone", "tiny-48",
                                     "--per-class", "5", "--out", str(png)], monkeypatch)
    assert code == 0, err
    assert f"wrote {png} (3 classes x 5 images, 48 px)" in " ".join(out.split())
    assert Image.open(png).size == tuple(round(v * DPI) for v in figure_inches(3, 5))


def test_a_missing_root_is_one_line_before_torch_loads(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "extract.preview", raising=False)
    code, _, err = run_main(main, ["preview", "--dataset", "imagefolder", "--root", str(tmp_path / "nowhere")], monkeypatch)
    assert "nowhere does not exist" in error_line(code, err)
    assert "extract.preview" not in sys.modules
    code, _, err = run_main(main, ["preview", "--dataset", "imagefolder"], monkeypatch)
    assert "needs --root PATH" in error_line(code, err)
