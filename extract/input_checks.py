"""Checks of what a built backbone is fed, shared by `extract` and `finetune`.

The input size must fit the backbone's patch grid. Every backbone names its input convolution
(`Backbone.first_conv`): on a ViT (DeiT, DINO, DINOv2, SAM, OpenCLIP, BLIP) it is the patch
embedding, kernel = stride = patch size and no padding, so a size that is not a multiple of the
patch silently drops the right and bottom strip (DeiT at 70 px: a 4 x 4 grid of 16 px patches covers
64 px and 6 are lost). A padded convolution (ResNet, SEEM) covers any size, and every later stage of
those families is padded too, so the first convolution decides.
"""

from __future__ import annotations

from torch import nn

from common.errors import MedfmError
from extract.backbones.base import Backbone

MIN_IMAGE_SIZE = 16  # as extract.transforms.check_input_settings


def uncovered_pixels(conv: nn.Conv2d, size: int) -> int:
    """Rows (and columns) at the bottom (and right) of a `size` input that no window of `conv` reads."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
    if padding == "same":
        return 0
    pad = 0 if padding == "valid" else int(padding)
    dilated = conv.dilation[0] * (kernel - 1) + 1
    if size + 2 * pad < dilated:
        return size
    last_start = (size + 2 * pad - dilated) // stride * stride - pad  # the last window's first pixel
    return max(0, size - (last_start + dilated))


def check_image_size(model: Backbone, backbone: str) -> None:
    """Refuse an input size whose border the backbone's patch grid would drop, naming the nearest sizes that fit."""
    size = model.data_config.input_size
    conv = model.get_submodule(model.first_conv)
    if not isinstance(conv, nn.Conv2d):
        return
    dropped = uncovered_pixels(conv, size)
    if not dropped:
        return
    below = next((s for s in range(size - 1, MIN_IMAGE_SIZE - 1, -1) if not uncovered_pixels(conv, s)), None)
    above = next(s for s in range(size + 1, size + 4 * conv.stride[0] + 64) if not uncovered_pixels(conv, s))
    sizes = f"{below} or {above}" if below is not None else str(above)
    raise MedfmError(f"--image-size {size} does not fit {backbone}'s {conv.stride[0]}-pixel patches: the last {dropped} pixel "
                     f"rows and columns would be dropped; use --image-size {sizes}")
