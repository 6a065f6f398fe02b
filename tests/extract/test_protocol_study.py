"""`protocol="study"`: each backbone rule of the official code (github.com/joanaapa/Foundation-Medical @ a7aa194),
checked against a small re-implementation of that rule written here from the official source, on tiny models.

Every test also shows that the default protocol gives something else, so it fails if the rule is not applied.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from timm.layers import resample_abs_pos_embed
from torch import nn
from transformers import BlipConfig, BlipForConditionalGeneration

from common.errors import MedfmError
from extract.backbones import create_backbone, list_backbones
from extract.inputs import check_image_size
from tests.tiny import TINY_BACKBONES, TINY_SAM_REFERENCE, TINY_VIT


def tiny(name: str, protocol: str, **kw: object) -> nn.Module:
    overrides, size, _, _ = TINY_BACKBONES[name]
    return create_backbone(name, "random", image_size=size, protocol=protocol, **overrides, **kw)


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every tensor, so that zero-initialised tables and 1e-4 layer scales matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return module.eval()


@torch.no_grad()
def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference of `a` from `b`."""
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float("inf")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- plumbing ----------------------------------------------------------------------------------------------------


def test_every_builder_takes_a_protocol_and_an_unknown_one_is_one_line() -> None:
    for spec in list_backbones():
        assert "protocol" in inspect.signature(spec.build).parameters, spec.name
    with pytest.raises(MedfmError, match="^--protocol must be medfm or study") as err:
        tiny("deit", "paper")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["deit", "dino", "resnet152", "sam"])
def test_families_without_a_study_rule_give_the_same_features(name: str) -> None:
    """SAM's rule applies when a checkpoint is fitted to the input size; random SAM weights are not resized."""
    size = TINY_BACKBONES[name][1]
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        medfm, study = tiny(name, "medfm")(x), tiny(name, "study")(x)
    assert torch.equal(medfm.pooled, study.pooled) and torch.equal(medfm.tokens, study.tokens)


# --- 1. BLIP: the pooled feature is the normed token 1 -------------------------------------------------------------


def test_blip_study_pooled_feature_is_the_normed_token_1() -> None:
    """The official BLIP ViT returns `x[:,1:,:], x[:,1,:]` after its final norm (utils/transformers/vit.py)."""
    x = torch.randn(2, 3, 64, 64)
    study, medfm = tiny("blip", "study"), tiny("blip", "medfm")
    with torch.inference_mode():
        normed = study.model.forward_features(x)  # timm's own forward: every token after the final norm
        ours, default = study(x), medfm(x)
    close(ours.pooled, normed[:, 1])
    close(ours.tokens, normed[:, 1:])
    close(default.pooled, normed[:, 0])  # medfm: the CLS token
    assert relative(default.pooled, ours.pooled) > 0.1


def test_blip_hf_folder_study_pooled_feature_is_the_normed_token_1(tmp_path: Path) -> None:
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, encoder_hidden_size=32),
    )
    full = BlipForConditionalGeneration(config)
    randomized(full.vision_model)
    full.save_pretrained(tmp_path / "blip-hf")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        hidden = full.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        ours = create_backbone("blip", str(tmp_path / "blip-hf"), image_size=64, protocol="study")(x)
        default = create_backbone("blip", str(tmp_path / "blip-hf"), image_size=64)(x)
    close(ours.pooled, hidden[:, 1])
    close(default.pooled, hidden[:, 0])
    assert relative(default.pooled, ours.pooled) > 0.1


# --- 2. SEEM: the study's one-channel stem -----------------------------------------------------------------------


def official_gray_seem(rgb: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """res2..res5 as the official code computes them after its one-channel rebuild (defaults/models.py): a
    `PatchEmbed(in_chans=1, is_stem=True, patch_size=(4, 4))` of utils/transformers/focal_dw.py, i.e. a 4x4 stride-4
    conv with no padding and no norm, whose weight is then replaced by the 7x7 R-channel kernel (`.data =`)."""
    net = rgb.model
    pretrained = net.patch_embed.proj
    conv = nn.Conv2d(1, pretrained.out_channels, kernel_size=(4, 4), stride=(4, 4))
    conv.weight.data = pretrained.weight.data.repeat(1, 4, 1, 1)[:, :1]
    conv.bias.data = pretrained.bias.data
    height, width = x.shape[-2:]
    if width % 4:
        x = F.pad(x, (0, 4 - width % 4))
    if height % 4:
        x = F.pad(x, (0, 0, 0, 4 - height % 4))
    h = conv(x).permute(0, 2, 3, 1)  # channels last, as the stages take it; no stem norm
    outs = []
    for i, stage in enumerate(net.layers):
        h = stage(h)
        outs.append(getattr(net, f"norm{i}")(h))
        if stage.downsample is not None:
            h = stage.downsample(h.permute(0, 3, 1, 2))
    return outs


@pytest.mark.parametrize("size", [64, 62])
def test_seem_study_gray_stem_is_the_official_rebuild(size: int) -> None:
    rgb = tiny("seem", "study")
    study, medfm = tiny("seem", "study", in_chans=1), tiny("seem", "medfm", in_chans=1)
    x = torch.randn(2, 1, size, size)
    with torch.inference_mode():
        expected = official_gray_seem(rgb, x)
        ours = study.forward_layers(x, [0, 1, 2, 3])
        default = medfm.forward_layers(x, [0, 1, 2, 3])
    for stage, ref in enumerate(expected):
        close(ours[stage].tokens, ref.flatten(1, 2))
        close(ours[stage].pooled, ref.mean((1, 2)))
    assert ours[0].tokens.shape[1] == 15 * 15 and default[0].tokens.shape[1] == 16 * 16  # no padding: one row fewer
    assert relative(default[3].pooled, ours[3].pooled) > 0.05
    assert not any(name.startswith("model.patch_embed.norm") for name, _ in study.named_parameters())


def test_seem_study_gray_stem_gives_55x55_at_224_and_passes_the_input_check() -> None:
    overrides = TINY_BACKBONES["seem"][0]
    study = create_backbone("seem", "random", image_size=224, in_chans=1, protocol="study", **overrides)
    medfm = create_backbone("seem", "random", image_size=224, in_chans=1, **overrides)
    x = torch.randn(1, 1, 224, 224)
    with torch.inference_mode():
        assert study.forward_layers(x, [0])[0].tokens.shape[1] == 55 * 55
        assert medfm.forward_layers(x, [0])[0].tokens.shape[1] == 56 * 56
        assert study(x).tokens.shape == medfm(x).tokens.shape  # 7 x 7 at res5 either way
    check_image_size(study, "seem")  # the study ran this size: its unpadded stem must not be refused


def test_seem_study_keeps_the_rgb_stem_and_the_r_kernel() -> None:
    rgb_study, rgb_medfm = tiny("seem", "study"), tiny("seem", "medfm")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(rgb_study(x).pooled, rgb_medfm(x).pooled)  # three channels: SEEM's own stem in both
    gray = tiny("seem", "study", in_chans=1)
    assert gray.in_chans == 1 and gray.model.patch_embed.proj.padding == (0, 0)
    assert torch.equal(gray.model.patch_embed.proj.weight, rgb_study.model.patch_embed.proj.weight[:, :1])
    assert torch.equal(gray.model.patch_embed.proj.bias, rgb_study.model.patch_embed.proj.bias)


# --- 3. SAM: global relative-position tables resized with nearest --------------------------------------------------


def official_sam_state(state: dict[str, torch.Tensor], image_size: int, patch: int, global_blocks: tuple[int, ...]) -> dict:
    """`filter_interpolate_weights` of the official utils/transformers/sam.py: the encoder's keys without the neck,
    the global blocks' rel-pos tables by `F.interpolate(size=2 * grid - 1)` (default mode), the position
    embedding bicubic with antialias."""
    out = {k[len("image_encoder."):]: v for k, v in state.items() if "image_encoder" in k and "neck" not in k}
    grid = image_size // patch
    for key in [k for k in out if "rel_pos_w" in k or "rel_pos_h" in k]:
        if int(key.split(".")[1]) in global_blocks:
            table = out[key]
            resized = F.interpolate(table.reshape(1, *table.shape).permute(0, 2, 1), size=2 * grid - 1).permute(0, 2, 1)
            out[key] = resized[0]
    out["pos_embed"] = F.interpolate(out["pos_embed"].permute(0, 3, 1, 2), size=grid, mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    return out


def test_sam_study_resizes_the_global_rel_pos_tables_with_nearest(tmp_path: Path) -> None:
    make = partial(ImageEncoderViT, norm_layer=partial(nn.LayerNorm, eps=1e-6), **TINY_SAM_REFERENCE)
    native = randomized(make(img_size=128))  # 8 x 8 grid: global tables of 15 rows, to be resized to 7 at 64 px
    state = {f"image_encoder.{k}": v for k, v in native.state_dict().items()}
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state | {"mask_decoder.iou_token.weight": torch.randn(1, 16)}, path)
    reference = make(img_size=64)
    reference.neck = nn.Identity()
    reference.load_state_dict(official_sam_state(state, 64, 16, TINY_SAM_REFERENCE["global_attn_indexes"]), strict=True)
    study = create_backbone("sam", str(path), image_size=64, protocol="study", **TINY_SAM_REFERENCE)
    medfm = create_backbone("sam", str(path), image_size=64, **TINY_SAM_REFERENCE)
    for key, table in reference.state_dict().items():
        assert torch.equal(study.model.state_dict()[key], table), key
    assert study.model.blocks[1].attn.rel_pos_h.shape == (7, 16)
    assert relative(medfm.model.blocks[1].attn.rel_pos_h, study.model.blocks[1].attn.rel_pos_h) > 0.1
    assert torch.equal(medfm.model.blocks[0].attn.rel_pos_h, study.model.blocks[0].attn.rel_pos_h)  # windowed: untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        trunk = reference(x).permute(0, 2, 3, 1)  # with the neck gone: the last block's map (permuted for the neck)
        ours, default = study(x), medfm(x)
    close(ours.tokens, trunk.flatten(1, 2))
    close(ours.pooled, trunk.mean((1, 2)))
    assert relative(default.tokens, ours.tokens) > 1e-3


# --- 4. OpenCLIP: tokens before ln_post ----------------------------------------------------------------------------


def official_openclip(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The study's patched open_clip `VisionTransformer.forward` (env_files/open_clip/transformer.py): tokens are
    taken from the transformer's output, only the pooled CLS goes through `ln_post`, then the projection."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(visual.patch_dropout(x))
    x = visual.transformer(x)  # open_clip >= 2.23 runs its transformer batch first
    pooled, tokens = x[:, 0], x[:, 1:]
    return visual.ln_post(pooled) @ visual.proj, tokens


def test_openclip_study_tokens_come_before_ln_post_and_the_pooled_feature_does_not_change() -> None:
    study, medfm = randomized(tiny("openclip", "study")), randomized(tiny("openclip", "medfm"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        pooled, tokens = official_openclip(study.model, x)
        ours, default = study(x), medfm(x)
        normed = study.model.ln_post(tokens)
    close(ours.tokens, tokens)
    close(ours.pooled, pooled)
    close(default.pooled, pooled)
    close(default.tokens, normed)  # medfm: after ln_post
    assert relative(default.tokens, ours.tokens) > 0.1


# --- 5. DINOv2: the 37 x 37 table, interpolated at every forward ---------------------------------------------------


def hub_interpolate_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, w: int, h: int, patch_size: int) -> torch.Tensor:
    """torch.hub DINOv2 (facebookresearch/dinov2, 2023) `DinoVisionTransformer.interpolate_pos_encoding`."""
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def hub_dinov2(vit: nn.Module, x: torch.Tensor, pos_embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The hub model's `prepare_tokens_with_masks` + blocks + norm, with `vit`'s weights: (normed CLS, pre-norm patches).

    `pos_embed` replaces the per-forward interpolation by a fixed table (what medfm's default loads)."""
    _, _, w, h = x.shape
    proj = vit.patch_embed.proj
    tokens = F.conv2d(x, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    tokens = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
    tokens = tokens + (hub_interpolate_pos_encoding(vit.pos_embed, tokens, w, h, proj.stride[0]) if pos_embed is None else pos_embed)
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)[:, 0], tokens[:, 1:]


def test_dinov2_study_keeps_the_native_table_and_interpolates_it_at_every_forward() -> None:
    study = randomized(tiny("dinov2", "study"))  # timm's 1e-5 layer scales would hide the blocks
    vit = study.model
    assert vit.pos_embed.shape == (1, 37 * 37 + 1, 32)  # the native 518-px table is the parameter
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        pooled, tokens = hub_dinov2(vit, x)
        ours = study(x)
        once = resample_abs_pos_embed(vit.pos_embed, new_size=[4, 4], num_prefix_tokens=1)  # timm at load: antialias
        by_size = torch.cat([vit.pos_embed[:, :1], F.interpolate(vit.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2),
                                                                 size=(4, 4), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 16, 32)], 1)
        table = hub_interpolate_pos_encoding(vit.pos_embed, torch.zeros(1, 17, 32), 56, 56, 14)
        default_pooled, _ = hub_dinov2(vit, x, pos_embed=once)
    close(ours.pooled, pooled)
    close(ours.tokens, tokens)
    assert relative(once, table) > 0.05 and relative(by_size, table) > 0.05  # the +0.1 scale factor matters too
    assert relative(default_pooled, pooled) > 1e-3
    # 224 px (16 x 16) from the full-size table, as the study ran it
    with torch.inference_mode():
        full = hub_interpolate_pos_encoding(vit.pos_embed, torch.zeros(1, 257, 32), 224, 224, 14)
        feats = study(torch.randn(1, 3, 224, 224))
    assert full.shape == (1, 257, 32) and feats.tokens.shape == (1, 256, 32)


def test_dinov2_study_trains_the_native_table() -> None:
    """Unfrozen, the 37 x 37 table is what trains: its gradient is the one through the hub's interpolation."""
    study = randomized(tiny("dinov2", "study")).train()
    x, weight = torch.randn(2, 3, 56, 56), torch.randn(32)
    (study(x).pooled * weight).sum().backward()
    ours = study.model.pos_embed.grad.clone()
    study.zero_grad()
    (hub_dinov2(study.model, x)[0] * weight).sum().backward()
    assert ours.shape == (1, 37 * 37 + 1, 32) and ours[0, 1:].abs().sum() > 0
    close(ours, study.model.pos_embed.grad)


def test_dinov2_study_loads_the_checkpoint_table_unresampled(tmp_path: Path) -> None:
    """A fake official file with a 7 x 7 table (the real one is 37 x 37): it is the parameter, bit for bit."""
    saved = randomized(timm.create_model("vit_base_patch14_dinov2", img_size=98, num_classes=0, **TINY_VIT))
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(saved.state_dict() | {"mask_token": torch.zeros(1, 32)}, path)
    study = create_backbone("dinov2", str(path), image_size=56, protocol="study", **TINY_VIT)
    medfm = create_backbone("dinov2", str(path), image_size=56, **TINY_VIT)
    assert torch.equal(study.model.pos_embed, saved.pos_embed)
    assert medfm.model.pos_embed.shape == (1, 17, 32)  # medfm resampled it once, to 4 x 4
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        pooled, tokens = hub_dinov2(saved, x)
        ours, default = study(x), medfm(x)
    close(ours.pooled, pooled)
    close(ours.tokens, tokens)
    assert relative(default.tokens, ours.tokens) > 1e-3
