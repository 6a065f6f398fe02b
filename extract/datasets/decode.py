"""Image files to 8-bit pixels: the one place where medfm decodes an image (docs/images.md).

`open_image` reads a file (DICOM by its `.dcm`/`.dicom` suffix or its `DICM` header, anything else with
Pillow, EXIF orientation applied) into an 8-bit `L` or `RGB` image; `to_mode` brings any decoded image
to the model's mode (`L` or `RGB`). The rules:

- 8-bit samples are kept as they are.
- Wider samples (16- and 32-bit integers, floats, and all DICOM greyscale after its LUTs) are scaled
  linearly so the image's own minimum becomes 0 and its maximum 255, over all channels together, then
  rounded: `round((v - min) / (max - min) * 255)`. A 0..65535 ramp therefore becomes `round(v / 257)`.
  Medical files seldom fill 16 bits (a 12-bit detector stores 0..4095 in them), so scaling by bit depth
  would leave a few dark grey levels; min-max keeps 256 levels and matches what the DICOM reader does.
  A constant image becomes black; an image holding NaN or infinity is refused.
- Transparent pixels are composited over black (`value * alpha / 255`); palette, CMYK, 1-bit, YCbCr
  and HSV images go through Pillow's own conversion to RGB.
- A file of several frames (a DICOM volume or cine loop, an enhanced CT/MR object, a multi-page TIFF) gives one
  frame: its middle one by default, or its first (`--frames first`); `--frames all` makes one sample of each frame
  (`extract/datasets/frames.py`), its reference a `Frame`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from common.errors import MedfmError

DECODER_VERSION = 2  # raised whenever a rule here changes: it enters every cache fingerprint, so old pixels are never reused
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MAGIC = b"DICM"  # at byte 128 of a DICOM file (after the preamble)
WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # more than 8 bits per sample: scaled min-max
GREY_MODES = ("1", "L", "LA", "La", *WIDE_MODES)  # decoded as one channel
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
MAX_PIXELS_ENV = "MEDFM_MAX_IMAGE_PIXELS"  # raises the decoding bound, for every format alike


@dataclass(frozen=True)
class Frame:
    """One frame of a multi-frame file, as `--frames all` makes it a sample of its own."""

    path: Path
    index: int

    def __str__(self) -> str:
        return f"{self.path}#frame={self.index}"


def pick_frame(count: int, which: str | int, path: Any) -> int:
    """The index of the frame `which` names (middle, first, or an index) among `count`."""
    if isinstance(which, int):
        if not 0 <= which < count:
            raise MedfmError(f"{path}: holds {count} frame(s), no frame {which}; the file changed since the dataset was listed")
        return which
    return count // 2 if which == "middle" else 0


def max_pixels() -> int:
    """The most pixels (width x height x frames) an image may decode to: Pillow's own bomb bound (twice its
    `MAX_IMAGE_PIXELS`, about 179 Mpixels) unless MEDFM_MAX_IMAGE_PIXELS says otherwise. A file claiming more is
    refused from its header, before anything is allocated (a 0.8 MB deflated DICOM can claim 20000 x 20000 x 16 bits)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return 2 * int(Image.MAX_IMAGE_PIXELS or 0) or 2**62
    try:
        return int(value)
    except ValueError:
        raise MedfmError(f"{MAX_PIXELS_ENV} must be a whole number of pixels, got '{value}'") from None


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` as an 8-bit `mode` (`L` or `RGB`) image, by the rules of this module."""
    image = to_8bit(image)
    return image if image.mode == mode else image.convert(mode)


def to_8bit(image: Image.Image) -> Image.Image:
    """`image` as 8-bit `L` (one channel in the file) or `RGB` (anything else), by the rules of this module."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if mode in WIDE_MODES:
        return Image.fromarray(scale_to_8bit(np.asarray(image)))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        return over_black(image)
    if mode == "1":
        return image.convert("L")
    try:
        return image.convert("RGB")  # P, CMYK, YCbCr, HSV, RGBX, ...: Pillow's own conversion
    except ValueError:
        raise MedfmError(f"an image of mode {mode} cannot be converted to RGB; save it as RGB or greyscale") from None


def scale_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale to uint8 over the whole array (all channels together); see the module's rules."""
    values = pixels.astype(np.float64)
    if not np.isfinite(values).all():
        raise MedfmError("the image holds NaN or infinite pixel values, so it cannot be scaled to 8 bits; fix or remove it")
    low, high = float(values.min()), float(values.max())
    if high > low:
        values = (values - low) / (high - low) * 255.0
    else:
        values = np.zeros_like(values)
    return np.round(values).astype(np.uint8)


def over_black(image: Image.Image) -> Image.Image:
    """An image with transparency composited over black: each value times alpha / 255, rounded."""
    grey = image.mode in GREY_MODES
    pixels = np.asarray(image.convert("LA" if grey else "RGBA"), dtype=np.float64)
    out = np.round(pixels[..., :-1] * (pixels[..., -1:] / 255.0)).astype(np.uint8)
    return Image.fromarray(out[..., 0] if grey else out)


def is_dicom(path: Path) -> bool:
    """A DICOM file by its suffix, or by the `DICM` header that follows the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == DICOM_MAGIC


def open_image(ref: Any, frames: str = "middle") -> Image.Image:
    """Decode one image file fully (so a truncated file fails here, not later) into 8-bit `L` or `RGB`.

    DICOM goes through `read_dicom`. Other files through Pillow, EXIF orientation applied. A file of several frames
    gives its middle frame (`frames="first"`: its first; a `Frame` reference: that frame), except an MPO JPEG, whose
    primary image is the image.
    """
    path, which = (ref.path, ref.index) if isinstance(ref, Frame) else (ref, frames)
    if isinstance(path, str | os.PathLike) and is_dicom(Path(path)):
        return read_dicom(path, which)
    if MAX_PIXELS_ENV in os.environ:
        Image.MAX_IMAGE_PIXELS = max_pixels() // 2  # Pillow refuses twice its bound: the same bound as DICOM's
    with Image.open(path) as img:
        count = getattr(img, "n_frames", 1)
        if count > 1 and img.format != "MPO":
            img.seek(pick_frame(count, which, path))
        img.load()
        return to_8bit(ImageOps.exif_transpose(img))


def frame_count(path: Any) -> int:
    """How many frames a file holds, read from its header (1 for a file that cannot say: decoding reports it)."""
    try:
        if is_dicom(Path(path)):
            import pydicom

            return max(int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames") or 1), 1)
        with Image.open(path) as img:
            return 1 if img.format == "MPO" else int(getattr(img, "n_frames", 1))
    except Exception:  # noqa: BLE001 - a damaged header is the decoder's to report, with the file, when it is read
        return 1


def read_dicom(path: Any, frame: str | int = "middle") -> Image.Image:
    """A DICOM image as 8-bit `L` (greyscale) or `RGB` (colour); anything else refused in one line. Of a file of several
    frames (a volume, a cine loop), `frame`: middle, first, or an index.

    Greyscale (MONOCHROME1/2): the modality LUT (or rescale slope/intercept), then the first VOI LUT (or
    window), both pydicom's own functions; scaled min-max to 8 bits; MONOCHROME1 inverted so that high
    is bright. Colour: YBR_FULL/YBR_FULL_422 converted to RGB with pydicom's `convert_color_space`
    (YBR_RCT/YBR_ICT come out of the JPEG 2000 decoder as RGB), PALETTE COLOR through its palette; kept
    as stored when 8-bit, scaled min-max when wider. Any transfer syntax and byte order that pydicom and
    its installed decoders handle.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import as_pixel_options, get_decoder

    try:
        ds = pydicom.dcmread(path)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except InvalidDicomError:
        raise MedfmError(f"{path}: not a DICOM Part 10 file (no 'DICM' header after a 128-byte preamble); "
                         "export it as DICOM Part 10 or as PNG") from None
    except Exception as err:  # noqa: BLE001 - pydicom fails in many ways on a damaged file; each is one line here
        raise MedfmError(f"{path}: cannot read this DICOM file ({_one_line(err)}); it may be damaged") from None
    syntax, count = _checked_header(ds, path)
    index = pick_frame(count, frame, path)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise MedfmError(f"{path}: pixel data encoded as '{syntax.name}' cannot be decoded by pydicom") from None
    try:
        pixels, meta = decoder.as_array(ds, index=index, raw=True, **as_pixel_options(ds))
    except Exception as err:  # noqa: BLE001 - decoders raise many types; the reason is kept, in one line
        raise MedfmError(f"{path}: cannot decode its '{syntax.name}' pixel data: {_one_line(err)}") from None
    return _to_image(pixels, meta, ds, path)


def _checked_header(ds: Any, path: Any) -> tuple[Any, int]:
    """The transfer syntax and frame count of a DICOM file fit to decode: pixel data present and described, within the
    decoding bound (rows x columns x frames); else one line saying which."""
    if "PixelData" not in ds:
        raise MedfmError(f"{path}: the DICOM file holds no image (no Pixel Data element)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not syntax:
        raise MedfmError(f"{path}: the DICOM file does not say how its pixels are encoded (no Transfer Syntax UID)")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except Exception as err:  # noqa: BLE001 - a malformed value fails on access, in several ways
        raise MedfmError(f"{path}: its Number of Frames is not a whole number ({_one_line(err)})") from None
    try:
        claimed = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * max(frames, 1)
    except Exception as err:  # noqa: BLE001 - as above
        raise MedfmError(f"{path}: its Rows or Columns is not a whole number ({_one_line(err)})") from None
    if claimed > max_pixels():
        raise MedfmError(f"{path}: the DICOM file claims {ds.get('Columns')} x {ds.get('Rows')} pixels x {frames} frame(s) "
                         f"({claimed / 1e6:.0f} Mpixels), above the decoding bound of {max_pixels() / 1e6:.0f} Mpixels; refused before "
                         f"decoding. If the image is real, raise the bound with {MAX_PIXELS_ENV}=<pixels>")
    return syntax, max(frames, 1)


def _to_image(pixels: np.ndarray, meta: dict[str, Any], ds: Any, path: Any) -> Image.Image:
    """Decoded DICOM pixels as 8-bit `L` or `RGB`, through pydicom's LUTs and colour conversions (see `read_dicom`)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    try:
        if photometric in MONOCHROME:
            if pixels.ndim != 2:
                raise ValueError(f"{photometric} with {pixels.shape[-1]} samples per pixel")
            values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
            scaled = scale_to_8bit(values)
            return Image.fromarray(255 - scaled if photometric == "MONOCHROME1" else scaled)
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            pixels = convert_color_space(pixels, photometric, "RGB")
        elif photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        elif photometric != "RGB":
            raise MedfmError(f"{path}: photometric interpretation '{photometric}' is not supported "
                             "(medfm reads MONOCHROME1/2, RGB, YBR_FULL(_422), YBR_RCT/ICT and PALETTE COLOR)")
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ValueError(f"{photometric} pixels of shape {pixels.shape}")
        rgb = pixels if pixels.dtype == np.uint8 else scale_to_8bit(pixels)
        return Image.fromarray(np.ascontiguousarray(rgb))
    except MedfmError as err:
        raise MedfmError(str(err) if str(err).startswith(str(path)) else f"{path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - LUTs and colour conversions reject odd headers in many ways
        raise MedfmError(f"{path}: cannot apply its {photometric} pixel transforms: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
