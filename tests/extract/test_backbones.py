"""All eight backbones of the study through their real code paths: shapes, layers, grayscale, parameter counts."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from common.study import STUDY_BACKBONES
from extract import cli as extract_cli
from extract.backbones import create_backbone, get_spec, list_backbones
from tests.tiny import TINY_BACKBONES as TINY

FIRST_CONV = {"openclip": "model.conv1", "resnet152": "model.conv1"}  # the rest: model.patch_embed.proj
STUDY_PARAMS = {
    "sam": 88_883_456, "seem": 29_922_288, "dinov2": 86_579_712, "openclip": 86_192_640,
    "blip": 85_798_656, "deit": 85_798_656, "dino": 85_798_656, "resnet152": 58_143_808,
}
NAMES = list(TINY)


def tiny(name: str, weights: object = "random", **kw: object) -> torch.nn.Module:
    overrides, size, _, _ = TINY[name]
    return create_backbone(name, weights, image_size=size, **overrides, **kw)


def test_the_registry_holds_the_eight_backbones_of_the_study() -> None:
    assert sorted(NAMES) == sorted(STUDY_BACKBONES)  # the later rows: tests/extract/test_backbones_named.py
    assert set(NAMES) <= {s.name for s in list_backbones()}


@pytest.mark.parametrize("name", NAMES)
def test_tiny_backbone_returns_pooled_and_tokens_of_its_declared_shape(name: str) -> None:
    _, size, pooled, tokens = TINY[name]
    model = tiny(name)
    with torch.inference_mode():
        feats = model(torch.randn(2, 3, size, size))
    assert feats.pooled.shape == (2, pooled) and feats.tokens.shape == (2, *tokens)
    assert (model.pooled_dim, model.token_dim) == (pooled, tokens[1])
    assert model.data_config.input_size == size and not model.training


@pytest.mark.parametrize("name", NAMES)
def test_full_size_shapes_at_224_match_the_registry(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):  # full size without the memory or the compute
        feats = create_backbone(name, "random")(torch.empty(1, 3, 224, 224))
    assert feats.pooled.shape == (1, spec.pooled_dim)
    assert feats.tokens.shape == (1, *spec.token_shape)


def test_parameter_counts_at_full_size_are_the_studys() -> None:
    counts = {name: get_spec(name).count_params() for name in NAMES}
    assert counts == STUDY_PARAMS


def test_extract_backbones_lists_all_eight_with_their_parameter_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(width=250, record=True, file=io.StringIO())
    monkeypatch.setattr(extract_cli, "console", console)
    extract_cli.backbones()
    lines = console.export_text().splitlines()
    for name, count in STUDY_PARAMS.items():
        row = next(i for i, line in enumerate(lines) if f" {name} " in line)
        assert f"{count / 1e6:.2f}" in lines[row] and get_spec(name).weights_file in lines[row + 1]  # the file: the next line


@pytest.mark.parametrize("name", NAMES)
def test_one_pass_gives_the_first_and_last_blocks_and_the_last_equals_forward(name: str) -> None:
    _, size, pooled, tokens = TINY[name]
    model = tiny(name)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        feats = model.forward_layers(x, [0, -1])
        plain = model(x)
    last = model.num_layers - 1
    assert sorted(feats) == [0, last]
    assert feats[0].pooled.shape[0] == 2 and feats[0].tokens.ndim == 3
    torch.testing.assert_close(feats[last].pooled, plain.pooled)
    torch.testing.assert_close(feats[last].tokens, plain.tokens)


def test_seem_stages_give_res2_to_res5() -> None:
    model = tiny("seem")
    with torch.inference_mode():
        feats = model.forward_layers(torch.randn(2, 3, 64, 64), [0, 1, 2, 3])
    assert [tuple(f.tokens.shape) for f in feats.values()] == [(2, 256, 8), (2, 64, 16), (2, 16, 32), (2, 4, 64)]
    assert [tuple(f.pooled.shape) for f in feats.values()] == [(2, 8), (2, 16), (2, 32), (2, 64)]


@pytest.mark.parametrize("name", NAMES)
def test_grayscale_first_conv_keeps_the_r_channel_kernel(name: str) -> None:
    _, size, pooled, _ = TINY[name]
    torch.manual_seed(0)
    rgb = tiny(name)
    torch.manual_seed(0)
    gray = tiny(name, in_chans=1)
    path = FIRST_CONV.get(name, "model.patch_embed.proj")
    conv_rgb, conv_gray = rgb.get_submodule(path), gray.get_submodule(path)
    assert conv_gray.in_channels == 1 and gray.in_chans == 1
    torch.testing.assert_close(conv_gray.weight, conv_rgb.weight[:, :1])
    with torch.inference_mode():
        assert gray(torch.randn(2, 1, size, size)).pooled.shape == (2, pooled)
