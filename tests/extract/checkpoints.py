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


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    """`state` as a .safetensors file at `path` (folders made), as the hub serves model.safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def nvidia_radio_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm RADIO ViT's tensors in NVIDIA's C-RADIO layout (nvidia/C-RADIOv3-B model.safetensors), which timm's filter
    maps back: `radio_model.model.` prefix, the patch embedding a bias-free linear over flattened patches, the CLS and
    register tokens one table, and the input conditioner and summary indices beside (dropped on load)."""
    state = model.state_dict()
    weight = state["patch_embed.proj.weight"]
    if state["patch_embed.proj.bias"].abs().max() > 0:
        raise ValueError("C-RADIO's patch embedding has no bias: zero the model's before writing its file")
    out = {"radio_model.model.patch_generator.embedder.weight": weight.reshape(weight.shape[0], -1),
           "radio_model.model.patch_generator.pos_embed": state["pos_embed"],
           "radio_model.model.patch_generator.cls_token.token": torch.cat([state["cls_token"][0], state["reg_token"][0]]),
           "radio_model.input_conditioner.norm_mean": torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1),
           "radio_model.input_conditioner.norm_std": torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1),
           "radio_model.summary_idxs": torch.tensor([0, 1, 2])}
    return out | {f"radio_model.model.{k}": v for k, v in state.items() if k.startswith("blocks.")}
