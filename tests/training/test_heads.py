"""Heads: shapes, the DeiT head built as the study appends it, weights loaded from a file, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch

from common.errors import MedfmError
from training.heads import DeiTHead, LinearHead, build_head, get_head, list_heads


def test_linear_head_maps_pooled_features_to_logits():
    head = build_head("linear", (16,), 3)
    assert isinstance(head, LinearHead)
    assert head(torch.randn(5, 16)).shape == (5, 3)


def test_deit_head_without_weights_starts_random_and_says_so():
    with pytest.warns(UserWarning, match="RANDOM"):
        head = DeiTHead(24, 4, depth=1, preset="deit-t")
    assert head.random_init
    assert head(torch.randn(2, 49, 24)).shape == (2, 4)  # 7x7 grid resampled on the fly from 14x14


def test_deit_head_with_fixed_grid_resamples_position_embedding_once():
    head = DeiTHead(8, 2, depth=1, preset="deit-t", weights="random", grid=(4, 4))
    assert head.pos_embed.shape == (1, 17, 192)
    assert head(torch.randn(3, 16, 8)).shape == (3, 2)
    with pytest.raises(MedfmError, match="grid"):
        head(torch.randn(1, 25, 8))


def test_deit_head_loads_blocks_from_an_official_style_checkpoint(tmp_path):
    full = timm.create_model("deit_tiny_patch16_224.fb_in1k", pretrained=False)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": full.state_dict()}, path)  # the official release wraps weights under "model"
    head = DeiTHead(8, 3, depth=2, preset="deit-t", weights=str(path))
    assert not head.random_init
    assert len(head.blocks) == 2
    assert torch.equal(head.blocks[1].attn.qkv.weight, full.blocks[1].attn.qkv.weight)
    assert torch.equal(head.cls_token, full.cls_token)


def test_deit_head_finds_default_weights_in_weights_dir(tmp_path, monkeypatch):
    full = timm.create_model("deit_tiny_patch16_224.fb_in1k", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "deit_tiny_patch16_224-a1311bcf.pth")
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    head = DeiTHead(8, 3, depth=1, preset="deit-t")
    assert head.weights_source.endswith("deit_tiny_patch16_224-a1311bcf.pth")
    assert torch.equal(head.blocks[0].norm1.weight, full.blocks[0].norm1.weight)


def test_bad_head_options_are_user_errors(tmp_path):
    with pytest.raises(MedfmError, match="preset"):
        DeiTHead(8, 2, preset="deit-xl")
    with pytest.raises(MedfmError, match="depth"):
        DeiTHead(8, 2, depth=0, weights="random")
    with pytest.raises(MedfmError, match="does not exist"):
        DeiTHead(8, 2, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(MedfmError, match="unknown head"):
        build_head("mlp", (8,), 2)


def test_the_registry_says_what_each_head_reads_and_builds_it_from_that_row_shape():
    """One registry replaces every `if head == ...`: the feature a head reads and how it is sized come from its entry."""
    assert {h.name: h.reads for h in list_heads()} == {"linear": "pooled", "deit": "tokens", "knn": "pooled", "zeroshot": "pooled"}
    assert [h.name for h in list_heads() if not h.trains] == ["knn", "zeroshot"]  # a fit of its own, no module
    for name in ("knn", "zeroshot"):
        with pytest.raises(MedfmError, match="no module"):
            build_head(name, (8,), 2)
    deit = build_head("deit", (16, 8), 3, depth=1, preset="deit-t", weights="random")
    assert deit.grid == (4, 4)  # the square grid of the 16 tokens, fixed at build
    assert get_head("deit").init(depth=1, preset="deit-t", weights="random") == "random"
    assert get_head("linear").init() == ""  # nothing pretrained to miss
