"""Decoding image files to 8-bit pixels (extract/datasets/decode.py, docs/images.md): every Pillow mode with
known values, EXIF orientation, the 16-bit rule end to end through extraction, and the DICOM reader against
pydicom's own pixels and LUTs on every test file pydicom ships."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cache.store import CacheReader
from common.errors import MedfmError
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource, Split
from extract.datasets.decode import Frame, open_image, read_dicom, to_mode
from extract.datasets.images import ImageDataset
from extract.runner import ExtractConfig, extract
from tests.layouts import write_dicom
from tests.tiny import BINARY, QUIET, TINY_SIZE, TINY_VIT_1


def saved(path: Path, image: Image.Image, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save)
    return path


def pixels_of(path: Path, mode: str) -> list:
    return np.asarray(to_mode(open_image(path), mode)).tolist()


def one_line_refusal(call, *args, match: str = "") -> str:
    with pytest.raises(MedfmError, match=match) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- Pillow modes: 8-bit kept, wider scaled min-max, alpha over black, Pillow's palette and CMYK conversions


def palette(indices: list[int], colours: list[int]) -> Image.Image:
    image = Image.new("P", (len(indices), 1))
    image.putpalette(colours)
    image.putdata(indices)
    return image


def test_eight_bit_one_bit_palette_and_cmyk_decode_to_their_known_values(tmp_path: Path) -> None:
    grey = saved(tmp_path / "l.png", Image.fromarray(np.array([[10, 200]], np.uint8)))
    assert pixels_of(grey, "L") == [[10, 200]] and pixels_of(grey, "RGB") == [[[10] * 3, [200] * 3]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    assert pixels_of(saved(tmp_path / "1.png", bits), "L") == [[0, 255]]
    red_blue = saved(tmp_path / "p.png", palette([0, 1], [255, 0, 0, 0, 0, 255]))
    assert Image.open(red_blue).mode == "P"
    assert pixels_of(red_blue, "RGB") == [[[255, 0, 0], [0, 0, 255]]]
    assert pixels_of(red_blue, "L") == [[76, 29]]  # ITU-R 601 luma, as Pillow converts RGB to L
    cmyk = saved(tmp_path / "cmyk.tif", Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 128, 255, 0, 0, 0])))
    assert Image.open(cmyk).mode == "CMYK" and pixels_of(cmyk, "RGB") == [[[127, 127, 127], [0, 255, 255]]]


def test_transparent_pixels_are_composited_over_black(tmp_path: Path) -> None:
    rgba = Image.frombytes("RGBA", (2, 1), bytes([200, 100, 50, 128, 10, 20, 30, 255]))
    assert pixels_of(saved(tmp_path / "rgba.png", rgba), "RGB") == [[[100, 50, 25], [10, 20, 30]]]
    la = Image.frombytes("LA", (2, 1), bytes([200, 128, 100, 255]))
    assert pixels_of(saved(tmp_path / "la.png", la), "L") == [[100, 100]]
    keyed = saved(tmp_path / "trns.png", palette([0, 1], [255, 0, 0, 0, 0, 255]), transparency=0)
    assert pixels_of(keyed, "RGB") == [[[0, 0, 0], [0, 0, 255]]]
    grey_keyed = saved(tmp_path / "grey_trns.png", Image.fromarray(np.array([[10, 200]], np.uint8)), transparency=10)
    assert pixels_of(grey_keyed, "L") == [[0, 200]]
    pa = palette([0, 1], [255, 0, 0, 0, 0, 255]).convert("PA")
    pa.putalpha(Image.frombytes("L", (2, 1), bytes([255, 64])))
    assert np.asarray(to_mode(pa, "RGB")).tolist() == [[[255, 0, 0], [0, 0, 64]]]


@pytest.mark.parametrize(("mode", "suffix", "values", "expected"), [
    ("I;16", ".png", [0, 1000, 4095], [0, 62, 255]),  # a 12-bit detector in a 16-bit file: all 256 levels used
    ("I;16B", ".tif", [0, 1000, 4095], [0, 62, 255]),
    ("I", ".tif", [-1000, 0, 3000], [0, 64, 255]),
    ("F", ".tif", [0.5, 1.0, 2.5], [0, 64, 255]),
])
def test_wide_samples_are_scaled_min_max(tmp_path: Path, mode: str, suffix: str, values: list, expected: list) -> None:
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    image = Image.frombytes(mode, (3, 1), np.array(values, dtype).tobytes())
    path = saved(tmp_path / f"wide{suffix}", image)
    assert Image.open(path).mode == mode
    assert pixels_of(path, "L") == [expected] and pixels_of(path, "RGB") == [[[v] * 3 for v in expected]]


def test_a_16bit_ramp_decodes_to_its_8bit_rescale_where_pillow_alone_clips_it(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = saved(tmp_path / "ramp.png", Image.fromarray(ramp))
    assert (np.asarray(Image.open(path).convert("L")) == 255).mean() > 0.99  # what a plain convert does
    rescaled = np.round(ramp / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(open_image(path)), rescaled)


def test_constant_nan_and_multi_frame_images(tmp_path: Path) -> None:
    flat = Image.frombytes("I;16", (2, 1), np.array([700, 700], "<u2").tobytes())
    assert np.asarray(to_mode(flat, "L")).tolist() == [[0, 0]]
    nan = Image.frombytes("F", (2, 1), np.array([0.0, np.nan], "<f4").tobytes())
    one_line_refusal(to_mode, nan, "L", match="NaN or infinite")
    stack = tmp_path / "stack.tif"
    Image.new("L", (2, 2)).save(stack, save_all=True, append_images=[Image.new("L", (2, 2), 9), Image.new("L", (2, 2), 20)])
    assert np.asarray(open_image(stack)).tolist() == [[9, 9], [9, 9]]  # the middle of 3 frames
    assert np.asarray(open_image(stack, "first")).tolist() == [[0, 0], [0, 0]]
    assert np.asarray(open_image(Frame(stack, 2))).tolist() == [[20, 20], [20, 20]]
    assert str(stack) in one_line_refusal(open_image, Frame(stack, 3), match="holds 3 frame")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    path = saved(tmp_path / "turned.png", Image.fromarray(pixels), exif=exif)
    assert np.array_equal(np.asarray(open_image(path)), np.rot90(pixels, k=-1))


def test_a_16bit_png_extracts_to_the_same_features_as_its_8bit_rescale(tmp_path: Path) -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls, image in (("a", ramp), ("b", ramp.T.copy())):
            saved(root / split / cls / "wide.png", Image.fromarray(image))
            saved(root / split / cls / "narrow.png", Image.fromarray(np.round(image / 257).astype(np.uint8)))
    cfg = ExtractConfig(backbone="deit", dataset="imagefolder", root=root, weights="random", out=tmp_path / "out",
                        batch_size=8, image_size=TINY_SIZE, workers=0, overrides=TINY_VIT_1)
    with CacheReader(extract(cfg, QUIET).path) as cache:
        assert cache.meta.skipped == ()
        for split in ("train", "test"):
            rows = dict(zip(cache.ids(split).tolist(), cache.features(split), strict=True))
            for cls in ("a", "b"):
                wide, narrow = rows[f"{split}/{cls}/wide.png"], rows[f"{split}/{cls}/narrow.png"]
                assert np.array_equal(wide, narrow)
            assert not np.array_equal(rows[f"{split}/a/wide.png"], rows[f"{split}/b/wide.png"])


# --- DICOM


def dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=pixels.dtype.itemsize * 8)
    for name, value in elements.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_rescale_then_window_then_min_max(tmp_path: Path) -> None:
    stored = np.array([[0, 1020, 1060, 2048]], np.int16)  # -1024, -4, 36, 1024 HU
    ct = dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    # air and bone fall outside the window (0 and 255); -4 and 36 HU land inside it: ((hu - 39.5) / 399 + 0.5) * 255
    assert np.asarray(read_dicom(ct)).tolist() == [[0, 100, 125, 255]]
    unwindowed = dicom(tmp_path / "plain.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024)
    assert np.asarray(read_dicom(unwindowed)).tolist() == [[0, 127, 132, 255]]
    inverted = dicom(tmp_path / "m1.dcm", np.array([[0, 100, 400]], np.uint16), "MONOCHROME1")
    assert np.asarray(read_dicom(inverted)).tolist() == [[255, 191, 0]]


def test_one_mr_in_seven_encodings_and_byte_orders_decodes_to_one_image() -> None:
    reference = np.asarray(read_dicom(get_testdata_file("MR_small.dcm")))
    assert reference.shape == (64, 64) and reference.min() == 0 and reference.max() == 255
    for name in ("MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(np.asarray(read_dicom(get_testdata_file(name))), reference), name


def test_dicom_colour_rgb_ybr_palette_and_wide_samples() -> None:
    rgb = read_dicom(get_testdata_file("SC_rgb_rle.dcm"))
    assert rgb.mode == "RGB" and np.asarray(rgb)[::20, 50].tolist() == [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [192, 192, 192]]  # pydicom's colour bands
    for name in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"):
        assert np.array_equal(np.asarray(read_dicom(get_testdata_file(name))), np.asarray(rgb)), name
    ybr = np.asarray(read_dicom(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))).astype(int)
    assert np.abs(ybr - np.asarray(rgb)).max() <= 8  # converted to RGB; left as YCbCr it would be off by ~200
    assert read_dicom(get_testdata_file("examples_palette.dcm")).mode == "RGB"
    big_endian = np.asarray(read_dicom(get_testdata_file("SC_rgb_small_odd_big_endian.dcm")))
    assert np.array_equal(big_endian, np.asarray(read_dicom(get_testdata_file("SC_rgb_small_odd.dcm"))))


def test_dicom_refusals_are_one_line_and_say_why(tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not an image\n")
    one_line_refusal(read_dicom, text, match="not a DICOM Part 10 file")
    one_line_refusal(read_dicom, get_testdata_file("rtplan.dcm"), match="no Pixel Data")
    one_line_refusal(read_dicom, get_testdata_file("MR_truncated.dcm"), match="cannot decode its 'Explicit VR Little Endian'")
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "absent.dcm")


def expected_pixels(path: str, frame: int = 0) -> np.ndarray:
    """pydicom's own `pixel_array` (colour already RGB; of a multi-frame file, frame `frame`), its LUTs, then the 8-bit
    rule, written out independently."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array if int(ds.get("NumberOfFrames") or 1) == 1 else ds.pixel_array[frame]
    photometric = ds.PhotometricInterpretation
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    elif photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.dtype != np.uint8 or photometric.startswith("MONOCHROME"):
        low, high = pixels.min(), pixels.max()
        pixels = np.round((pixels.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)
    return 255 - pixels if photometric == "MONOCHROME1" else pixels


DAMAGED = {  # pydicom's deliberately broken single-frame files, and why each is refused
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode",  # a delimiter inside the codestream
    "JPEG-lossy.dcm": "cannot decode",  # a misplaced JPEG marker
    "MR_truncated.dcm": "cannot decode",  # fewer bytes than the image needs
    "nested_priv_SQ.dcm": "Bits Allocated",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID",
    "badVR.dcm": "Number of Frames is not a whole number",
}


def test_every_pydicom_test_file_decodes_like_pydicom_or_is_refused_in_one_line() -> None:
    decoded: set[str] = set()
    refused: dict[str, str] = {}
    multi_frame = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the oddities these files are made of
        for path in get_testdata_files():
            if os.path.isdir(path):
                continue
            try:
                image = read_dicom(path)
            except MedfmError as err:
                assert "\n" not in str(err) and str(err).startswith(path)
                refused[path] = str(err)
                continue
            frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1)
            assert np.array_equal(np.asarray(image), expected_pixels(path, frames // 2)), path
            decoded.add(pydicom.dcmread(path).file_meta.TransferSyntaxUID.name)
            multi_frame += frames > 1
    for syntax in ("JPEG 2000 Image Compression", "JPEG-LS Lossless Image Compression", "RLE Lossless",
                   "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
                   "JPEG Extended (Process 2 and 4)", "JPEG Baseline (Process 1)", "Explicit VR Big Endian",
                   "Deflated Explicit VR Little Endian", "JPEG-LS Lossy (Near-Lossless) Image Compression"):
        assert syntax in decoded, syntax
    with_pixels = {Path(p).name: m for p, m in refused.items() if "no Pixel Data" not in m and "not a DICOM Part 10 file" not in m}
    assert set(with_pixels) <= set(DAMAGED), with_pixels  # nothing refused but the damaged files
    for name, message in with_pixels.items():
        assert DAMAGED[name] in message, message
    assert multi_frame >= 5  # pydicom's volumes and cine loops (7 of its files with pixel data) read, their middle frame


def test_a_multi_frame_dicom_gives_its_middle_or_first_frame_or_one_sample_per_frame(tmp_path: Path) -> None:
    cine = np.stack([np.full((4, 4), v, np.uint16) for v in (0, 1, 2)]) + np.arange(16, dtype=np.uint16).reshape(4, 4)
    path = dicom(tmp_path / "data" / "a" / "cine.dcm", cine)
    assert np.array_equal(np.asarray(read_dicom(path)), np.asarray(read_dicom(dicom(tmp_path / "f1.dcm", cine[1]))))
    assert np.array_equal(np.asarray(read_dicom(path, "first")), np.asarray(read_dicom(dicom(tmp_path / "f0.dcm", cine[0]))))
    dicom(tmp_path / "data" / "b" / "one.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    (tmp_path / "data" / "labels.csv").write_text("path,label,split,patient\na/cine.dcm,x,test,p1\nb/one.dcm,y,test,p2\n")
    source = get_dataset("csv", tmp_path / "data", split_column="split", frames="all")
    test = source.splits["test"]
    assert test.ids == ["a/cine.dcm#frame=0", "a/cine.dcm#frame=1", "a/cine.dcm#frame=2", "b/one.dcm"]
    assert test.labels.tolist() == [0, 0, 0, 1] and test.metadata["patient"] == ["p1", "p1", "p1", "p2"]
    assert np.array_equal(np.asarray(source.load_image(test.images[2])), np.asarray(read_dicom(path, 2)))
    assert source.options["frames"] == "all"  # fingerprinted with the dataset's options
    assert get_dataset("csv", tmp_path / "data", split_column="split").splits["test"].ids == ["a/cine.dcm", "b/one.dcm"]
    with pytest.raises(MedfmError, match="--frames must be one of middle, first, all, got 'last'"):
        get_dataset("csv", tmp_path / "data", split_column="split", frames="last")


# --- the user's own datasets read DICOM through the same reader


def test_imagefolder_and_csv_read_dicom_files(tmp_path: Path) -> None:
    ct = np.array([[0, 1020, 1060, 2048]], np.int16)
    for folder in ("train/a", "train/b", "test/a", "test/b"):
        dicom(tmp_path / "folder" / folder / "scan.dcm", ct, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
        saved(tmp_path / "folder" / folder / "photo.png", Image.new("L", (4, 1), 7))
    source = get_dataset("imagefolder", tmp_path / "folder")
    refs = dict(zip(source.splits["train"].ids, source.splits["train"].images, strict=True))
    assert sorted(refs) == ["train/a/photo.png", "train/a/scan.dcm", "train/b/photo.png", "train/b/scan.dcm"]
    assert np.asarray(source.load_image(refs["train/a/scan.dcm"])).tolist() == [[0, 100, 125, 255]]
    bare = dicom(tmp_path / "table" / "IM0001", ct)  # hospital exports often carry no suffix: found by the DICM header
    write_dicom(tmp_path / "table" / "IM0002", np.arange(16, dtype=np.uint16).reshape(4, 4))
    (tmp_path / "table" / "labels.csv").write_text("path,label,split\nIM0001,x,train\nIM0002,y,test\n")
    table = get_dataset("csv", tmp_path / "table", split_column="split")
    assert np.asarray(table.load_image(table.splits["train"].images[0])).tolist() == np.asarray(read_dicom(bare)).tolist()


def test_a_refused_image_is_flagged_with_its_one_line_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_text("not an image\n")
    good = dicom(tmp_path / "one.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    source = DatasetSource("mine", BINARY, {"test": Split(["bad", "one"], np.array([0, 1]), [bad, good])})
    images = ImageDataset(source, "test", lambda image: torch.from_numpy(np.array(image)), (1, 4, 4))
    _, ok, reason = images[0]
    assert not ok and reason.startswith(str(bad)) and "not a DICOM Part 10 file" in reason and "MedfmError" not in reason
    pixels, ok, reason = images[1]
    assert ok and reason == "" and pixels[0, 0].item() == 0 and pixels[-1, -1].item() == 255


def test_a_dicom_claiming_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """The DICOM twin of a PNG decompression bomb: 20000 x 20000 x 16 bits claimed; refused in one line, nothing
    allocated; MEDFM_MAX_IMAGE_PIXELS lowers or raises the bound for every format alike."""
    bomb = dicom(tmp_path / "bomb.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns = 20000, 20000  # the header claims 400 Mpixels; the pixel data is 32 bytes
    ds.save_as(bomb)
    with pytest.raises(MedfmError, match=r"claims 20000 x 20000 pixels x 1 frame\(s\) \(400 Mpixels\), above the decoding bound of 179 "):
        read_dicom(bomb)
    small = dicom(tmp_path / "small.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
    monkeypatch.setenv("MEDFM_MAX_IMAGE_PIXELS", "15")
    with pytest.raises(MedfmError, match="above the decoding bound .* MEDFM_MAX_IMAGE_PIXELS"):
        read_dicom(small)
    monkeypatch.setenv("MEDFM_MAX_IMAGE_PIXELS", "16")
    assert read_dicom(small).size == (4, 4)


def test_extract_run_frames_all_stores_one_row_per_frame_in_its_files_split(tmp_path: Path, monkeypatch) -> None:
    from cache.store import CacheReader
    from extract.cli import main
    from tests.tiny import TINY_SIZE, run_main

    for i in range(4):
        ramp = np.arange(64, dtype=np.uint16).reshape(8, 8)
        dicom(tmp_path / "data" / f"cine{i}.dcm", np.stack([ramp if k == 0 else ramp.T * k for k in range(3)]))
    (tmp_path / "data" / "labels.csv").write_text("path,label,split\n" + "".join(
        f"cine{i}.dcm,{'ab'[i % 2]},{('train', 'train', 'val', 'test')[i]}\n" for i in range(4)))
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path / "out"))
    args = ["run", "--backbone", "deit", "--dataset", "csv", "--root", str(tmp_path / "data"), "--weights", "random",
            "--image-size", str(TINY_SIZE), "--opt", "split_column=split", "--override", "depth=1", "--override", "embed_dim=16",
            "--override", "num_heads=2", "--no-tokens", "--frames", "all"]
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    [path] = (tmp_path / "out" / "features").rglob("*.h5")
    with CacheReader(path) as reader:
        assert list(reader.ids("test")) == [f"cine3.dcm#frame={k}" for k in range(3)]
        assert len(reader.ids("train")) == 6 and reader.meta.settings["dataset_options"]["frames"] == "all"
        pooled = reader.features("test")
    assert not np.allclose(pooled[0], pooled[2])  # each frame its own features
