"""`extract datasets --inspect`: what a dataset folder's files hold, counted from their headers, and which of medfm's
decoding rules (docs/images.md) touch them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from extract.cli import main
from tests.tiny import run_main


def folder(root: Path) -> None:
    """An image folder of two classes: plain RGB, a 16-bit grey PNG, an RGBA PNG, and a JPEG rotated by EXIF."""
    for i in range(3):
        (root / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), 10 * i).save(root / "a" / f"{i}.png")
    (root / "b").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(root / "b" / "wide.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(root / "b" / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.new("RGB", (8, 8), 50).save(root / "b" / "turned.jpg", exif=exif)


def test_inspect_counts_modes_bits_orientations_and_alpha_and_says_what_the_decoder_does(tmp_path: Path, monkeypatch) -> None:
    folder(tmp_path / "data")
    code, out, err = run_main(main, ["datasets", "--inspect", "--dataset", "imagefolder", "--root", str(tmp_path / "data")], monkeypatch)
    assert code == 0, err
    assert "6 file(s) inspected" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and not line.strip().startswith("-")}
    assert "RGB: 4" in lines["mode"] and "I;16: 1" in lines["mode"] and "RGBA: 1" in lines["mode"]
    assert "16: 1" in lines["bits"] and lines["alpha"].split()[-1] == "1"
    assert "6: 1" in out.split("EXIF orientation")[1].splitlines()[0]
    assert "1 file(s) carry an EXIF orientation" in out and "1 file(s) have transparency" in out
    assert "1 file(s) hold more than 8 bits" in out


def test_inspect_of_plain_files_says_so_and_bad_input_is_one_line(tmp_path: Path, monkeypatch) -> None:
    for i in range(4):
        (tmp_path / "d" / "x").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), i).save(tmp_path / "d" / "x" / f"{i}.png")
        (tmp_path / "d" / "y").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), i).save(tmp_path / "d" / "y" / f"{i}.png")
    code, out, _ = run_main(main, ["datasets", "--inspect", "--dataset", "imagefolder", "--root", str(tmp_path / "d"), "--limit", "3"], monkeypatch)
    assert code == 0 and "3 file(s) inspected" in out and "decoded as it is" in out
    code, _, err = run_main(main, ["datasets", "--inspect"], monkeypatch)
    assert code == 2 and err.strip().splitlines()[-1] == "error: --inspect needs --dataset (and --root for a dataset on disk)"
    code, _, err = run_main(main, ["datasets", "--inspect", "--dataset", "imagefolder", "--root", str(tmp_path / "d"), "--limit", "0"], monkeypatch)
    assert code == 2 and "--limit must be at least 1" in err
