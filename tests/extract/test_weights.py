"""Weights load safely and strictly: pickled code is refused, wrappers are tolerated, partial files are errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.backbones.weights import load_state_dict
from tests.extract.checkpoints import randomize_
from tests.tiny import TINY_BACKBONES as TINY
from tests.tiny import TINY_VIT


class RunsCodeOnLoad:
    """An object whose unpickling runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2)}, "payload": RunsCodeOnLoad(marker)}, path)
    return path, marker


def test_a_pickle_that_runs_code_is_refused_and_never_runs(malicious: tuple[Path, Path]) -> None:
    path, marker = malicious
    with pytest.raises(MedfmError, match="refusing to load"):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sam", "seem", "openclip", "blip", "deit"])
def test_every_family_refuses_the_malicious_pickle(malicious: tuple[Path, Path], name: str) -> None:
    path, marker = malicious
    overrides, size, _, _ = TINY[name]
    with pytest.raises(MedfmError, match="refusing to load"):
        create_backbone(name, str(path), image_size=size, **overrides)
    assert not marker.exists()


def test_bytes_that_are_no_torch_file_are_one_error_whatever_they_trip(tmp_path: Path) -> None:
    """Random bytes trip torch's unpickler in many ways (UnpicklingError, IndexError, KeyError, UnicodeDecodeError):
    300 seeded files cover each of them, and every one must be the one-line `MedfmError` naming the file."""
    path = tmp_path / "weights.pth"
    for seed in range(300):
        path.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(MedfmError, match=rf"^cannot read weights file {path}|^refusing to load {path}"):
            load_state_dict(path)


def seem_checkpoint() -> dict[str, torch.Tensor]:
    overrides = TINY["seem"][0]
    model = randomize_(create_backbone("seem", "random", **overrides).model)
    return {f"backbone.{k}": v for k, v in model.state_dict().items()} | {"sem_seg_head.predictor.query_feat.weight": torch.randn(3, 4)}


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"model": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
], ids=["flat", "model-wrapper", "state_dict-wrapper-with-module-prefix"])
def test_seem_checkpoint_loads_flat_or_wrapped(tmp_path: Path, wrap) -> None:
    state = seem_checkpoint()
    path = tmp_path / "seem_focalt_v0.pt"
    torch.save(wrap(state), path)
    model = create_backbone("seem", str(path), **TINY["seem"][0])
    for key, value in model.model.state_dict().items():
        torch.testing.assert_close(value, state[f"backbone.{key}"])


def test_seem_checkpoint_missing_a_tensor_is_an_error_naming_it(tmp_path: Path) -> None:
    state = seem_checkpoint()
    del state["backbone.layers.2.blocks.0.dw1.weight"]
    torch.save(state, tmp_path / "seem.pt")
    with pytest.raises(MedfmError, match=r"layers\.2\.blocks\.0\.dw1\.weight"):
        create_backbone("seem", str(tmp_path / "seem.pt"), **TINY["seem"][0])


def test_timm_family_refuses_a_file_missing_trunk_tensors(tmp_path: Path) -> None:
    """timm alone would load it non-strictly (the head differs) and leave block 1 random."""
    state = randomize_(timm.create_model("deit_base_patch16_224", img_size=64, num_classes=10, **TINY_VIT)).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    torch.save({"model": state}, tmp_path / "deit.pth")
    with pytest.raises(MedfmError, match=r"blocks\.1\."):
        create_backbone("deit", str(tmp_path / "deit.pth"), image_size=64, **TINY_VIT)


def test_blip_file_without_a_visual_encoder_says_what_to_pass(tmp_path: Path) -> None:
    torch.save({"model": {"text_encoder.embeddings.weight": torch.zeros(2, 2)}}, tmp_path / "model_base.pth")
    with pytest.raises(MedfmError, match="visual_encoder"):
        create_backbone("blip", str(tmp_path / "model_base.pth"), image_size=64, **TINY_VIT)


def test_missing_default_weights_name_the_file_and_the_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name, expected in [("sam", "sam_vit_b_01ec64.pth"), ("seem", "seem_focalt_v0.pt"), ("blip", "model_base.pth")]:
        with pytest.raises(MedfmError, match=rf"{expected}.*{tmp_path}"):
            create_backbone(name)


def test_default_weights_are_found_in_the_weights_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch.save(seem_checkpoint(), tmp_path / "seem_focalt_v0.pt")
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    model = create_backbone("seem", **TINY["seem"][0])
    assert model.weights.kind == "pretrained" and model.weights.path == tmp_path / "seem_focalt_v0.pt"


def test_random_weights_of_another_draw_are_another_model_with_its_own_identity() -> None:
    from extract.backbones.registry import get_spec
    from extract.backbones.weights import resolve_weights

    spec = get_spec("deit")
    assert resolve_weights(spec, "random").identity == {"kind": "random", "file": None, "sha256": None}  # as before the draws
    assert resolve_weights(spec, "random:3").identity["seed"] == 3
    first, again, other = (create_backbone("deit", w, image_size=32, **TINY_VIT) for w in ("random", "random:0", "random:1"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(first.forward_layers(x, [0])[0].pooled, again.forward_layers(x, [0])[0].pooled)
    assert not torch.allclose(first.forward_layers(x, [0])[0].pooled, other.forward_layers(x, [0])[0].pooled)
    with pytest.raises(MedfmError, match="random:SEED takes a whole number"):
        resolve_weights(spec, "random:-1")


def test_a_null_draws_cache_is_found_only_when_its_draw_is_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cache.layout import find_cache
    from tests.probe.caches import make_cache

    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path))
    own = make_cache(tmp_path / "features" / "deit" / "demo-aaaaaaaaaaaa.h5", tokens=None)
    null = make_cache(tmp_path / "features" / "deit" / "demo-bbbbbbbbbbbb.h5", tokens=None, weights={"kind": "random", "seed": 1})
    assert find_cache("deit", "demo") == own and find_cache("deit", "demo", backbone_seed=1) == null
    with pytest.raises(MedfmError, match=r"random draw 2.*--weights random:2"):
        find_cache("deit", "demo", backbone_seed=2)
