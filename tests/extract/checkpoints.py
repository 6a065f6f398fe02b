"""Fake checkpoints in an official key layout, with random values in every tensor: shared by the reference,
extraction and weight-loading tests of the backbones."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from tests.tiny import TINY_SAM_REFERENCE


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every tensor, so that zero-initialised position tables and 1e-4 layer scales matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return module.eval()


def official_sam_file(tmp_path: Path, native: int) -> tuple[Path, nn.Module]:
    """A tiny SAM checkpoint laid out like sam_vit_b_01ec64.pth: image_encoder.* (with neck) + the decoder parts."""
    encoder = randomize_(ImageEncoderViT(img_size=native, out_chans=16, norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY_SAM_REFERENCE))
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state |= {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 8), "mask_decoder.iou_token.weight": torch.randn(1, 16)}
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)
    return path, encoder
