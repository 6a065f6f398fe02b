"""Each family loads a fake checkpoint in its official key layout strictly, and its features equal those of the
reference implementation with the same weights: segment_anything, upstream SEEM, open_clip, transformers, timm."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig, BlipForConditionalGeneration, BlipVisionConfig, BlipVisionModel

from extract.backbones import create_backbone
from tests.extract.checkpoints import official_sam_file, randomize_
from tests.tiny import TINY_SAM_REFERENCE, TINY_VIT

DATA = Path(__file__).parent / "data"


def assert_features(ours: torch.nn.Module, x: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor) -> None:
    with torch.inference_mode():
        feats = ours(x)
    torch.testing.assert_close(feats.pooled, pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.tokens, tokens, atol=1e-4, rtol=1e-4)


# --- SAM: segment_anything's ImageEncoderViT ---------------------------------------------------------------


def sam_trunk(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's own forward, read at the last block (before the neck) with a hook."""
    seen = []
    handle = encoder.blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.inference_mode():
        encoder(x)
    handle.remove()
    return seen[0]


def test_sam_equals_segment_anything_encoder_at_its_native_size(tmp_path: Path) -> None:
    path, encoder = official_sam_file(tmp_path, native=64)
    x = torch.randn(2, 3, 64, 64)
    trunk = sam_trunk(encoder, x)
    ours = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    assert_features(ours, x, trunk.mean((1, 2)), trunk.flatten(1, 2))


def test_sam_at_a_smaller_size_equals_segment_anything_with_its_pos_embed_interpolated(tmp_path: Path) -> None:
    path, encoder = official_sam_file(tmp_path, native=128)
    with torch.no_grad():  # what the study does by hand; the rel-pos tables segment_anything resizes itself
        grid = F.interpolate(encoder.pos_embed.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", antialias=True)
        encoder.pos_embed = nn.Parameter(grid.permute(0, 2, 3, 1))
    x = torch.randn(2, 3, 64, 64)
    trunk = sam_trunk(encoder, x)
    ours = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    assert ours.model.pos_embed.shape == (1, 4, 4, 32)
    assert_features(ours, x, trunk.mean((1, 2)), trunk.flatten(1, 2))


def test_sam_at_a_smaller_size_equals_timm_samvit_resampling_at_run_time(tmp_path: Path) -> None:
    path, _ = official_sam_file(tmp_path, native=128)
    kw = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=2, neck_chans=16)
    ref = timm.create_model("samvit_base_patch16.sa1b", pretrained=True, img_size=128, **kw,
                            pretrained_cfg_overlay=dict(state_dict=torch.load(path, weights_only=True))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        trunk = ref.forward_intermediates(x, indices=1, intermediates_only=True)[0].permute(0, 2, 3, 1)
    ours = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    assert_features(ours, x, trunk.mean((1, 2)), trunk.flatten(1, 2))


def test_sam_loads_timms_copy_of_the_weights(tmp_path: Path) -> None:
    ref = randomize_(timm.create_model("samvit_base_patch16", img_size=64, embed_dim=32, depth=2, num_heads=2,
                                       global_attn_indexes=[1], window_size=2, neck_chans=16))
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        trunk = ref.forward_intermediates(x, indices=1, intermediates_only=True)[0].permute(0, 2, 3, 1)
    ours = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    assert_features(ours, x, trunk.mean((1, 2)), trunk.flatten(1, 2))


# --- SEEM: outputs of the upstream focal_dw.py ----------------------------------------------------------------


def test_seem_equals_upstream_focal_dw_on_every_stage(tmp_path: Path) -> None:
    """data/seem_focal_dw_tiny.pt holds a tiny random checkpoint in SEEM's layout (backbone.* + head tensors), an
    odd-sized input and res2..res5 computed by SEEM's own focal_dw.py (UX-Decoder/Segment-Everything-Everywhere-
    All-At-Once @7b2e76d, detectron2 imports stubbed, Focal-T flags: conv embed, post-LN, layer scale, scaling modulator)."""
    ref = torch.load(DATA / "seem_focal_dw_tiny.pt", weights_only=True)
    path = tmp_path / "seem_focalt_v0.pt"
    torch.save(ref["checkpoint"], path)
    ours = create_backbone("seem", str(path), **ref["config"])
    with torch.inference_mode():
        feats = ours.forward_layers(ref["input"], [0, 1, 2, 3])
    for stage, f in feats.items():
        expected = ref["outputs"][f"res{stage + 2}"]
        torch.testing.assert_close(f.tokens, expected.flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f.pooled, expected.mean((2, 3)), atol=1e-4, rtol=1e-4)


# --- OpenCLIP: open_clip's own image tower and load_checkpoint ------------------------------------------------

OPENCLIP_VISION = dict(patch_size=16, width=32, layers=2, head_width=16)


def tiny_clip(image_size: int) -> nn.Module:
    text = dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=image_size, **OPENCLIP_VISION), text_cfg=text)


@pytest.mark.parametrize("size", [64, 32], ids=["native", "resized-pos-embed"])
def test_openclip_equals_open_clip_visual_tower_and_its_tokens(tmp_path: Path, size: int) -> None:
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(randomize_(tiny_clip(64)).state_dict(), path)
    ref = tiny_clip(size)
    open_clip.load_checkpoint(ref, str(path))  # open_clip's own loader (resizes the position embedding itself)
    ref.visual.output_tokens = True
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        pooled, tokens = ref.eval().visual(x)
    ours = create_backbone("openclip", str(path), image_size=size, embed_dim=16, **OPENCLIP_VISION)
    assert_features(ours, x, pooled, tokens)
    assert (ours.pooled_dim, ours.token_dim) == (16, 32)


# --- BLIP: transformers' BLIP vision model --------------------------------------------------------------------

TIMM_TO_HF = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
              ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
              (".norm1", ".layer_norm1"), (".norm2", ".layer_norm2"), ("attn.qkv", "self_attn.qkv"),
              ("attn.proj", "self_attn.projection")]


def to_hf(key: str) -> str:
    """timm ViT key -> HF BlipVisionModel key (docs/backbones.md §5)."""
    if key.startswith("norm."):
        return "post_layernorm." + key[len("norm."):]
    for old, new in TIMM_TO_HF:
        key = key.replace(old, new)
    return key


def test_blip_original_checkpoint_equals_transformers_blip_vision_model(tmp_path: Path) -> None:
    vit = randomize_(timm.create_model("vit_base_patch16_224", img_size=64, num_classes=0, **TINY_VIT))
    path = tmp_path / "model_base.pth"
    torch.save({"model": {f"visual_encoder.{k}": v for k, v in vit.state_dict().items()} | {"text_encoder.embeddings.word": torch.randn(4, 8)}}, path)
    ref = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=64, patch_size=16, layer_norm_eps=1e-6))
    ref.load_state_dict({to_hf(k): v for k, v in vit.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        hidden = ref.eval()(pixel_values=x).last_hidden_state
    ours = create_backbone("blip", str(path), image_size=64, **TINY_VIT)
    assert_features(ours, x, hidden[:, 0], hidden[:, 1:])  # CLS is index 0 (the study's code took index 1)


@pytest.mark.parametrize("size", [64, 32], ids=["native", "interpolated-pos-embed"])
def test_blip_hf_folder_equals_the_vision_model_of_blip_for_conditional_generation(tmp_path: Path, size: int) -> None:
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, encoder_hidden_size=32),
    )
    full = BlipForConditionalGeneration(config)
    randomize_(full.vision_model)
    full.save_pretrained(tmp_path / "blip-hf")
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        hidden = full.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    ours = create_backbone("blip", str(tmp_path / "blip-hf"), image_size=size)
    assert_features(ours, x, hidden[:, 0], hidden[:, 1:])


# --- timm family: timm's own model loading the same official file ---------------------------------------------


def deit_file(path: Path) -> None:  # {'model': {..., head.*}}
    torch.save({"model": randomize_(timm.create_model("deit_base_patch16_224", img_size=64, num_classes=10, **TINY_VIT)).state_dict()}, path)


def dino_file(path: Path) -> None:  # flat timm-style keys, no head
    torch.save(randomize_(timm.create_model("vit_base_patch16_224", img_size=64, num_classes=0, **TINY_VIT)).state_dict(), path)


def dinov2_file(path: Path) -> None:  # flat, mask_token, position embedding of a larger grid (518 px in the real file)
    model = randomize_(timm.create_model("vit_base_patch14_dinov2", img_size=98, num_classes=0, **TINY_VIT))
    torch.save(model.state_dict() | {"mask_token": torch.zeros(1, 32)}, path)


def resnet_file(path: Path) -> None:  # torchvision layout with fc
    torch.save(randomize_(timm.create_model("resnet152", layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=10)).state_dict(), path)


TIMM_CASES = {  # ours -> (timm tag, write the fake file, tiny kwargs, input size)
    "deit": ("deit_base_patch16_224.fb_in1k", deit_file, dict(img_size=64, **TINY_VIT), 64),
    "dino": ("vit_base_patch16_224.dino", dino_file, dict(img_size=64, **TINY_VIT), 64),
    "dinov2": ("vit_base_patch14_dinov2.lvd142m", dinov2_file, dict(img_size=56, **TINY_VIT), 56),
    "resnet152": ("resnet152.tv_in1k", resnet_file, dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)), 64),
}


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_family_equals_timm_loading_the_same_official_file(tmp_path: Path, name: str) -> None:
    tag, write, kw, size = TIMM_CASES[name]
    path = tmp_path / "official.pth"
    write(path)
    ref = timm.create_model(tag, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        if name == "resnet152":
            fmap = ref.forward_features(x)
            pooled, tokens = fmap.mean((2, 3)), fmap.flatten(2).transpose(1, 2)
        else:
            pooled = ref.forward_features(x)[:, 0]
            tokens = ref.forward_intermediates(x, indices=1, norm=name != "dinov2", output_fmt="NLC", intermediates_only=True)[0]
    kw = {k: v for k, v in kw.items() if k != "img_size"}
    ours = create_backbone(name, str(path), image_size=size, **kw)
    assert_features(ours, x, pooled, tokens)
