"""The 2025 and medical rows (`extract/backbones/named.py`): each row's tiny instance, built through its own code path,
equals its library's own forward with the same weights, read from a fake checkpoint written in the official key layout
under the hub's file name (found in $MEDFM_WEIGHTS_DIR as `default`); a renamed key is one line. Then what the registry
declares (shapes at 224, weights files) and the `extract backbones` listing at 80 columns."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import MedfmError
from common.study import MEDICAL_BACKBONES, MODERN_BACKBONES, STUDY_BACKBONES
from extract import cli as extract_cli
from extract.backbones import create_backbone, get_spec, list_backbones
from extract.backbones.by_name import OPEN_CLIP_CONFIGS, TINY_TEXT
from extract.backbones.named import BIOMEDCLIP
from extract.backbones.weights import resolve_weights
from tests.extract.checkpoints import nvidia_radio_state, randomize_, save_safetensors
from tests.extract.test_weights import RunsCodeOnLoad

NAMED = MODERN_BACKBONES + MEDICAL_BACKBONES
SIZE = 32  # the tiny instances' input: position tables are resampled or interpolated to it, as the rows' are to 224
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_HIERA = {"embed_dim": 8, "num_heads": 1, "stages": (1, 1, 2, 1), "global_att_blocks": (3,), "window_spec": (4, 2, 2, 2),
              "global_pos_size": (4, 4)}  # SAM 2's shape: windowed and global blocks, q-pooling at each stage
TINY_HF = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8}
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # the library's own (pooled, tokens)


@dataclass(frozen=True)
class Case:
    """A row's tiny overrides, the writer of its official file (returning the library's own forward on those weights),
    and a key of that file to rename."""

    overrides: dict
    write: Callable[[Path], Forward]
    renamed: str


def timm_case(model: str, source: dict, reference: dict, pooled: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
              layout: Callable[[nn.Module], dict] = lambda m: m.state_dict()) -> Callable[[Path], Forward]:
    """A random timm model (built with `source`) written in `layout`; the reference is timm reading that file with its own
    loader and checkpoint filter (built with `reference`). `pooled` None: timm's own head."""

    def write(path: Path) -> Forward:
        src = randomize_(timm.create_model(model.partition(".")[0], num_classes=0, **source))
        if layout is nvidia_radio_state:  # C-RADIO's patch embedding has no bias
            nn.init.zeros_(src.patch_embed.proj.bias)
        save_safetensors(layout(src), path)
        ref = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, **reference).eval()

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            final = ref.forward_features(x)
            tokens = final[:, ref.num_prefix_tokens:] if final.ndim == 3 else final.flatten(1, 2)  # Hiera: an NHWC map
            return (ref(x) if pooled is None else pooled(ref, x)), tokens

        return forward

    return write


def open_clip_case(arch: str, vision: dict, embed_dim: int) -> Callable[[Path], Forward]:
    """open_clip's own CLIP with the row's image tower (a tiny timm trunk) and a tiny text tower, its whole state written
    as the hub's open_clip checkpoint; the reference is its `encode_image` and its trunk's tokens."""

    def write(path: Path) -> Forward:
        cfg = OPEN_CLIP_CONFIGS.get(arch) or open_clip.get_model_config(arch)
        ref = randomize_(open_clip.model.CLIP(embed_dim, {**cfg["vision_cfg"], **vision}, dict(TINY_TEXT)))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".bin":
            torch.save(ref.state_dict(), path)
        else:
            save_safetensors(ref.state_dict(), path)
        ref.visual.set_input_size(SIZE)  # as the row does, after loading: timm's own resample
        trunk = ref.visual.trunk
        return lambda x: (ref.encode_image(x), trunk.forward_features(x)[:, trunk.num_prefix_tokens:])

    return write


def rad_dino(folder: Path) -> Forward:
    """A Dinov2Model saved as microsoft/rad-dino is (save_pretrained: config.json, model.safetensors in the hub's names)."""
    from transformers import Dinov2Config, Dinov2Model

    ref = randomize_(Dinov2Model(Dinov2Config(image_size=518, **TINY_HF)))
    ref.save_pretrained(folder)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = ref(pixel_values=x)  # Dinov2 interpolates its 64 x 64 position table itself
        return out.pooler_output, out.last_hidden_state[:, 1:]

    return forward


def medsiglip(folder: Path) -> Forward:
    """A whole SiglipModel (image and text towers) saved as google/medsiglip-448 is."""
    from transformers import SiglipConfig, SiglipModel

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 100,
            "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    vision = {**TINY_HF, "intermediate_size": 64, "image_size": 448}
    ref = randomize_(SiglipModel(SiglipConfig(vision_config=vision, text_config=text)))
    ref.save_pretrained(folder)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = ref.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        tokens = ref.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        return getattr(pooled, "pooler_output", pooled), tokens

    return forward


def hf_case(write: Callable[[Path], Forward]) -> Callable[[Path], Forward]:
    return lambda path: write(path.parent)  # save_pretrained writes the hub's file names into the repository's folder


DINOV3 = {**TINY_VIT, "global_pool": "token"}
CASES = {
    "dinov3": Case(TINY_VIT, timm_case("vit_base_patch16_dinov3.lvd1689m", DINOV3 | {"img_size": SIZE}, DINOV3 | {"img_size": SIZE}),
                   "blocks.0.attn.qkv.weight"),
    "siglip2": Case({"timm_model_name": "vit_tiny_patch16_224"}, open_clip_case("ViT-B-16-SigLIP2", {"timm_model_name": "vit_tiny_patch16_224"}, 192),
                    "visual.trunk.blocks.0.attn.qkv.weight"),
    "sam2": Case(TINY_HIERA, timm_case("sam2_hiera_base_plus.fb_r896_2pt1", TINY_HIERA, TINY_HIERA,
                                       pooled=lambda ref, x: ref.forward_features(x).mean((1, 2))), "blocks.0.attn.qkv.weight"),
    "radio": Case(TINY_VIT, timm_case("vit_base_patch16_radio_v3.c_radio", TINY_VIT | {"img_size": 64}, TINY_VIT | {"img_size": SIZE},
                                      layout=nvidia_radio_state), "radio_model.model.blocks.0.attn.qkv.weight"),  # 4 x 4 -> 2 x 2 table
    "pe_core": Case({"timm_model_name": "vit_pe_core_tiny_patch16_384", "embed_dim": 16},
                    open_clip_case("PE-Core-B-16", {"timm_model_name": "vit_pe_core_tiny_patch16_384"}, 16),
                    "visual.trunk.blocks.0.attn.qkv.weight"),
    "rad_dino": Case(TINY_HF, hf_case(rad_dino), "encoder.layer.0.attention.attention.query.weight"),
    "medsiglip": Case({**TINY_HF, "intermediate_size": 64}, hf_case(medsiglip), "vision_model.encoder.layers.0.self_attn.q_proj.weight"),
    "biomedclip": Case({"timm_model_name": "vit_tiny_patch16_224", "embed_dim": 16},
                       open_clip_case(BIOMEDCLIP, {"timm_model_name": "vit_tiny_patch16_224"}, 16), "visual.trunk.blocks.0.attn.qkv.weight"),
}


def official_file(name: str, weights_dir: Path) -> tuple[Path, Forward]:
    """The row's official file, written where `default` finds it ($MEDFM_WEIGHTS_DIR/<hub repository>/<file>)."""
    path = weights_dir / get_spec(name).weights_file
    return path, CASES[name].write(path)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMED)
def test_each_row_loads_its_official_file_and_equals_its_librarys_own_forward(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    path, reference = official_file(name, tmp_path)
    ours = create_backbone(name, "default", image_size=SIZE, **CASES[name].overrides)
    assert ours.weights.kind == "pretrained" and ours.weights.path == path
    x = images()
    with torch.inference_mode():
        feats = ours(x)
        pooled, tokens = reference(x)
    torch.testing.assert_close(feats.pooled, pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.tokens, tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMED)
def test_a_renamed_key_in_the_official_file_is_one_line(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    path, _ = official_file(name, tmp_path)
    key = CASES[name].renamed
    if path.suffix == ".bin":
        state = torch.load(path, weights_only=True)
        state[key.replace(".weight", "_renamed.weight")] = state.pop(key)
        torch.save(state, path)
    else:
        state = load_file(path)
        state[key.replace(".weight", "_renamed.weight")] = state.pop(key)
        save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(MedfmError, match=r"^weights file .* not fit .*(Missing key|missing: )") as err:
        create_backbone(name, "default", image_size=SIZE, **CASES[name].overrides)
    assert "\n" not in str(err.value) and "_renamed" in str(err.value)


@pytest.mark.parametrize("name", NAMED)
def test_one_channel_keeps_the_r_kernel_so_gray_equals_rgb_with_zero_g_and_b(name: str) -> None:
    rgb = create_backbone(name, "random", image_size=SIZE, **CASES[name].overrides)
    gray = create_backbone(name, "random", image_size=SIZE, in_chans=1, **CASES[name].overrides)
    x = images()[:, :1]
    with torch.inference_mode():
        torch.testing.assert_close(gray(x).pooled, rgb(torch.cat([x, torch.zeros_like(x), torch.zeros_like(x)], 1)).pooled,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMED)
def test_a_file_that_runs_code_is_refused_and_never_runs(name: str, tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "weights.bin"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(2)}, "payload": RunsCodeOnLoad(marker)}, path)
    with pytest.raises(MedfmError, match="^refusing to load"):
        create_backbone(name, str(path), image_size=SIZE, **CASES[name].overrides)
    assert not marker.exists()


def test_the_rows_follow_the_study_modules_sets_and_name_their_official_files() -> None:
    names = [spec.name for spec in list_backbones()]
    assert names[-len(NAMED):] == list(NAMED)
    spec = get_spec("radio")  # NVIDIA's own file first, timm's converted copy also found in the hub cache
    assert spec.weights_file == "nvidia/C-RADIOv3-B/model.safetensors"
    assert spec.hub_files == (("nvidia/C-RADIOv3-B", "model.safetensors"), ("timm/vit_base_patch16_radio_v3.c_radio", "model.safetensors"))
    with pytest.raises(MedfmError, match=r"^official weights for 'medsiglip' not found: download google/medsiglip-448/model.safetensors "
                                         r"from https://huggingface.co/google/medsiglip-448/resolve/main/model.safetensors"):
        resolve_weights(get_spec("medsiglip"), "default")


@pytest.mark.parametrize("name", NAMED)
def test_full_size_at_224_gives_the_declared_shapes_input_and_norm(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):  # full size, without the memory or the compute
        model = create_backbone(name, "random")
        feats = model(torch.empty(1, 3, 224, 224))
    assert model.data_config.input_size == 224
    assert feats.pooled.shape == (1, spec.pooled_dim) and feats.tokens.shape == (1, *spec.token_shape)
    expected = {"rad_dino": ((0.5307,) * 3, "bicubic"), "medsiglip": ((0.5,) * 3, "bilinear"), "siglip2": ((0.5,) * 3, "bicubic"),
                "pe_core": ((0.5,) * 3, "bilinear")}
    if name in expected:  # the transformers rows' processors, open_clip's pretrained configs
        assert (model.data_config.mean, model.data_config.interpolation) == expected[name]


def test_extract_backbones_lists_the_rows_by_set_within_80_columns(monkeypatch) -> None:
    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(extract_cli, "console", console)
    extract_cli.backbones()
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    listed: dict[str, list[str]] = {}
    for line in lines:  # a set's heading, then each row's line (two spaces in) and its weights file (indented further)
        if not line.startswith(" "):
            listed[line.split()[0]] = []
        elif not line.startswith("   "):
            listed[list(listed)[-1]].append(line.split()[0])
    assert list(listed)[:3] == ["study", "2025", "medical"]
    assert sorted(listed["study"]) == sorted(STUDY_BACKBONES)
    assert listed["2025"] == list(MODERN_BACKBONES) and listed["medical"] == list(MEDICAL_BACKBONES)
    dinov3 = next(i for i, line in enumerate(lines) if line.startswith("  dinov3 "))
    assert "85.64M" in lines[dinov3] and lines[dinov3].endswith("196 x 768")
    assert lines[dinov3 + 1].strip().rpartition(": ")[0] == "timm/vit_base_patch16_dinov3.lvd1689m/model.safetensors"
    biomedclip = next(i for i, line in enumerate(lines) if line.startswith("  biomedclip "))  # a path over 80 columns: two lines
    assert lines[biomedclip + 1].strip() == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/"
    assert lines[biomedclip + 2].strip() in ("open_clip_pytorch_model.bin: missing", "open_clip_pytorch_model.bin: found")


def test_check_backbone_on_a_named_row_names_the_library_model_to_check_instead() -> None:
    from extract.backbones.check import check_backbone

    with pytest.raises(MedfmError, match=r"'dinov3' is built from timm:vit_base_patch16_dinov3\.lvd1689m; check your weights with: "
                                         r"extract check-backbone timm:vit_base_patch16_dinov3\.lvd1689m --override global_pool=token"):
        check_backbone("dinov3")
