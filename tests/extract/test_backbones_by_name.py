"""Backbones named by their library, with no code of their own: `timm:NAME`, `open_clip:ARCH[@PRETRAINED]`, `hf:FOLDER`.

Tiny random instances of the real code paths (constructor overrides, a config saved to a folder), fake checkpoints
written by the libraries themselves, and every comparison against the library's own forward.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cache.layout import find_cache, open_cache
from common.errors import MedfmError
from extract.backbones import create_backbone, get_spec
from extract.backbones.check import check_backbone
from extract.backbones.weights import resolve_weights, sha256_file
from extract.cli import main
from extract.names import _open_clip_config_models, _timm_source_models
from extract.names import check_backbone as check_name
from tests.conftest import REPO
from tests.extract.checkpoints import randomize_
from tests.tiny import run_main

VIT = "timm:vit_small_patch16_224"
TINY_TIMM = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}  # 4 patches of 16 px, 1 CLS
TINY_OPEN_CLIP = {"embed_dim": 16, "width": 32, "layers": 2, "head_width": 16, "patch_size": 8}  # at 32 px: 16 patches
DINOV2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def overrides_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--override", f"{key}={value}")]


def images(size: int, n: int = 2, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def timm_file(path: Path, **changes) -> Path:
    """A tiny vit_small_patch16_224 checkpoint written from timm's own model (random values in every tensor)."""
    import timm

    model = randomize_(timm.create_model("vit_small_patch16_224", num_classes=0, **(TINY_TIMM | changes)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def dinov2_folder(path: Path, registers: int = 0) -> Path:
    """A tiny Dinov2 model saved with save_pretrained (random values in every tensor), as `hf:` reads a folder."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **DINOV2))
    else:
        model = Dinov2Model(Dinov2Config(**DINOV2))
    randomize_(model).save_pretrained(path)
    return path


# --- names, before torch ------------------------------------------------------------------------------------------------


def test_the_listings_read_without_torch_are_the_libraries_own() -> None:
    import open_clip
    import timm

    assert set(_timm_source_models()) == set(timm.list_models())
    assert set(_open_clip_config_models()) == set(open_clip.list_models())


NEAREST = """
import sys
from extract.cli import main
for name in ("timm:vit_smal_patch16_224", "open_clip:ViT-B-16-SigLIP3", "tim:vit_small_patch16_224"):
    sys.argv = ["extract", "run", "--backbone", name, "--dataset", "demo"]
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code == 2, exit_.code
assert "torch" not in sys.modules and "timm" not in sys.modules and "open_clip" not in sys.modules
print("no torch")
"""


def test_an_unknown_library_name_is_one_line_naming_the_nearest_before_torch_loads() -> None:
    proc = subprocess.run([sys.executable, "-c", NEAREST], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no torch", proc.stderr
    timm_line, open_clip_line, prefix_line = proc.stderr.strip().splitlines()
    assert timm_line.startswith("error: unknown timm model 'vit_smal_patch16_224'; nearest: vit_small_patch16_224, ")
    assert open_clip_line.startswith("error: unknown open_clip model 'ViT-B-16-SigLIP3'; nearest: ") and "ViT-B-16-SigLIP2," in open_clip_line
    assert prefix_line.startswith("error: unknown backbone library 'tim' in 'tim:vit_small_patch16_224' (did you mean timm:?)")


def test_an_unknown_pretrained_tag_and_a_missing_hf_model_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match=r"^timm has no pretrained tag 'augreg_in22k' for vit_small_patch16_224; nearest: augreg_in21k"):
        get_spec("timm:vit_small_patch16_224.augreg_in22k")
    with pytest.raises(MedfmError, match=r"^open_clip has no pretrained tag 'laion2b' for ViT-B-16; nearest: "):
        get_spec("open_clip:ViT-B-16@laion2b")
    with pytest.raises(MedfmError, match=r"is neither a folder nor a model in the Hugging Face cache"):
        check_name("hf:nobody/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedfmError, match=r"has no config.json"):
        check_name(f"hf:{tmp_path / 'empty'}")


def test_default_weights_are_looked_up_where_the_hub_puts_them_and_never_downloaded(tmp_path: Path, monkeypatch) -> None:
    spec = get_spec("timm:vit_small_patch16_224.augreg_in21k_ft_in1k")
    assert spec.weights_file == "timm/vit_small_patch16_224.augreg_in21k_ft_in1k/model.safetensors"
    with pytest.raises(MedfmError, match=r"download timm/vit_small_patch16_224.augreg_in21k_ft_in1k/model.safetensors from https://"):
        resolve_weights(spec, "default")
    monkeypatch.setenv("MEDFM_WEIGHTS_DIR", str(tmp_path))
    path = timm_file(tmp_path / "x.safetensors")
    (tmp_path / spec.weights_file).parent.mkdir(parents=True)
    path.rename(tmp_path / spec.weights_file)
    resolved = resolve_weights(spec, "default")
    assert resolved.kind == "pretrained" and resolved.path == tmp_path / spec.weights_file
    siglip = get_spec("open_clip:ViT-B-16-SigLIP2")  # one pretrained set: the name implies it
    assert siglip.hub_files == (("timm/ViT-B-16-SigLIP2", "open_clip_model.safetensors"),
                                ("timm/ViT-B-16-SigLIP2", "open_clip_pytorch_model.bin"))
    with pytest.raises(MedfmError, match=r"open_clip:ViT-B-16 names no pretrained weights: name them as open_clip:ViT-B-16@TAG"):
        resolve_weights(get_spec("open_clip:ViT-B-16"), "default")


# --- timm -------------------------------------------------------------------------------------------------------------


def test_timm_by_name_extracts_a_cache_a_probe_trains_on_with_no_code_added(isolated_outputs: Path, monkeypatch) -> None:
    from probe.cli import main as probe

    monkeypatch.setattr("extract.backbones.library._SAID", set())  # what was worked out is said once per process
    args = ["run", "--backbone", VIT, "--dataset", "demo", "--weights", "random", "--opt", "per_class=6", "--layers", "0,-1",
            "--batch-size", "64", "--workers", "0", "--device", "cpu", *overrides_args(TINY_TIMM)]
    code, out, err = run_main(main, args, monkeypatch)
    assert code == 0, err
    assert "pooled 32 = the CLS token after the final norm" in err and "(1 prefix token dropped)" in err  # said once
    with open_cache(find_cache(VIT, "demo"), VIT, "demo") as reader:
        meta = reader.meta
        assert meta.backbone.name == VIT and meta.backbone.random_weights
        assert meta.settings["backbone"] == VIT and meta.settings["weights"] == {"kind": "random", "file": None, "sha256": None}
        assert reader.features("train").shape[1:] == (32,) and reader.features("train", "tokens@0").shape[1:] == (4, 32)
    code, out, err = run_main(probe, ["run", "--backbone", VIT, "--dataset", "demo", "--epochs", "2", "--device", "cpu"], monkeypatch)
    assert code == 0, err
    from ledger.store import Ledger

    rows = Ledger().rows()
    assert [(r.backbone, r.scenario) for r in rows] == [(VIT, "frozen-linear")]


def test_timm_by_name_equals_timms_own_forward_on_every_block(tmp_path: Path) -> None:
    import timm

    path = timm_file(tmp_path / "tiny.safetensors")
    ours = create_backbone(VIT, str(path), **TINY_TIMM)
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                               **TINY_TIMM).eval()
    x = images(32)
    with torch.inference_mode():
        feats = ours.forward_layers(x, [0, 1])
        torch.testing.assert_close(feats[1].pooled, theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats[1].tokens, theirs.forward_features(x)[:, 1:], atol=1e-5, rtol=1e-5)
        blocks = theirs.forward_intermediates(x, indices=[0, 1], norm=True, output_fmt="NLC", intermediates_only=True)
        for index in (0, 1):  # block K: the model's own norm and pooling applied to block K (the model cut after it)
            torch.testing.assert_close(feats[index].tokens, blocks[index], atol=1e-5, rtol=1e-5)
    assert ours.weights.identity == {"kind": "file", "file": "tiny.safetensors", "sha256": sha256_file(path)}
    assert ours.data_config.mean == (0.5, 0.5, 0.5) and ours.data_config.input_size == 32  # timm's pretrained cfg
    assert ours.first_conv == "model.patch_embed.proj" and ours.num_layers == 2 and list(ours.blocks) == list(ours.model.blocks)


def test_a_timm_cnn_reads_its_stages_and_pools_each_as_timm_does() -> None:
    import timm

    tiny = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}
    ours = create_backbone("timm:resnet18", "random", image_size=64, **tiny)
    theirs = timm.create_model("resnet18", num_classes=0, **tiny).eval()
    theirs.load_state_dict({k.removeprefix("model."): v for k, v in ours.state_dict().items()})
    x = images(64)
    with torch.inference_mode():
        feats = ours.forward_layers(x, [0, 1, 2, 3])
        torch.testing.assert_close(feats[3].pooled, theirs(x))
        torch.testing.assert_close(feats[3].tokens, theirs.forward_features(x).flatten(2).transpose(1, 2))
        stage0 = theirs.layer1(theirs.maxpool(theirs.act1(theirs.bn1(theirs.conv1(x)))))
        torch.testing.assert_close(feats[0].pooled, stage0.mean((2, 3)))
    assert [tuple(f.tokens.shape[1:]) for f in feats.values()] == [(256, 8), (64, 16), (16, 32), (4, 64)]
    assert ours.first_conv == "model.conv1" and ours.token_shape() == (4, 64)
    gray = create_backbone("timm:resnet18", "random", image_size=64, in_chans=1, **tiny)
    assert gray(images(64, channels=1)).pooled.shape == (2, 64)


# --- open_clip --------------------------------------------------------------------------------------------------------


def test_open_clip_by_name_is_the_image_tower_and_equals_open_clips_own_forward(tmp_path: Path) -> None:
    """A tiny ViT-B-16 (vision-config overrides; open_clip's own create_model builds the reference)."""
    report = check_backbone("open_clip:ViT-B-16", "random", image_size=32, overrides=TINY_OPEN_CLIP, device="cpu")
    assert report.passed, report.failures
    assert report.pooled["max_abs_error"] <= report.pooled["bound"] and report.tokens["shape"] == [2, 16, 32]
    assert report.worked_out.startswith("open_clip:ViT-B-16: pooled 16 = the CLS token after ln_post, projected")
    assert set(report.layers["compared"]) == {"0", "1"}
    assert "encode_image" in report.reference


def test_open_clip_siglip2_reads_its_timm_tower_attention_pool() -> None:
    """ViT-B-16-SigLIP2's tower is open_clip's TimmModel; a tiny timm ViT stands in for its trunk."""
    model = create_backbone("open_clip:ViT-B-16-SigLIP2", "random", image_size=32, timm_model_name="vit_tiny_patch16_224")
    assert "an attention pool (MAP head)" in model.pooled_rule and model.data_config.mean == (0.5, 0.5, 0.5)  # the webli tag's
    x = images(32)
    with torch.inference_mode():
        feats = model.forward_layers(x, [0, -1])
        torch.testing.assert_close(feats[11].pooled, model.model(x))  # open_clip's TimmModel forward
        intermediates = model.model.forward_intermediates(x, indices=[0, 11], normalize_intermediates=True, output_fmt="NLC",
                                                          intermediates_only=True)["image_intermediates"]
    torch.testing.assert_close(feats[0].tokens, intermediates[0])
    torch.testing.assert_close(feats[11].tokens, intermediates[1])


# --- Hugging Face ------------------------------------------------------------------------------------------------------


def test_hf_folder_by_name_equals_transformers_own_forward(tmp_path: Path) -> None:
    from transformers import Dinov2Model

    folder = dinov2_folder(tmp_path / "dinov2-tiny")
    ours = create_backbone(f"hf:{folder}", "default")  # the folder holds the weights
    theirs = Dinov2Model.from_pretrained(folder).eval()
    x = images(32)
    with torch.inference_mode():
        out = theirs(pixel_values=x)
        feats = ours(x)
    torch.testing.assert_close(feats.pooled, out.pooler_output)
    torch.testing.assert_close(feats.tokens, out.last_hidden_state[:, 1:])
    identity = ours.weights.identity
    assert identity["kind"] == "pretrained" and identity["file"] == "dinov2-tiny" and len(identity["architecture"]) == 64
    gray = create_backbone(f"hf:{folder}", "default", in_chans=1)  # the embedding is told it takes one channel
    assert gray(images(32, channels=1)).tokens.shape == (2, 16, 32)


def test_hf_register_tokens_are_dropped_from_the_tokens(tmp_path: Path) -> None:
    folder = dinov2_folder(tmp_path / "dinov2-reg", registers=2)
    report = check_backbone(f"hf:{folder}", "default", device="cpu")
    assert report.passed, report.failures
    assert "(3 prefix tokens dropped)" in report.worked_out and report.tokens["shape"] == [2, 16, 32]
    assert set(report.layers["compared"]) == {"0", "1"}  # each block against transformers' hidden_states, normed
    assert report.weights["sha256"] == sha256_file(folder)
    receipt = Path(report.receipt)
    assert receipt == folder.with_name("dinov2-reg.medfm-check.json")  # beside the folder, never inside it
    assert json.loads(receipt.read_text())["passed"] is True


def test_hf_takes_a_task_models_weights_file_its_prefix_and_head_dropped(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2ForImageClassification

    folder = dinov2_folder(tmp_path / "dinov2-tiny")  # the architecture; the weights come from the file
    classifier = randomize_(Dinov2ForImageClassification(Dinov2Config(num_labels=3, **DINOV2)), seed=3)
    path = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, path)  # dinov2.* and classifier.*
    ours = create_backbone(f"hf:{folder}", str(path))
    x = images(32)
    with torch.inference_mode():
        out = classifier.dinov2(pixel_values=x)
        torch.testing.assert_close(ours(x).pooled, out.pooler_output)
    assert ours.weights.identity["sha256"] == sha256_file(path)


# --- check-backbone ------------------------------------------------------------------------------------------------------


def test_check_backbone_passes_and_writes_a_receipt_beside_the_weights(tmp_path: Path, monkeypatch) -> None:
    path = timm_file(tmp_path / "tiny.safetensors")
    code, out, err = run_main(main, ["check-backbone", VIT, "--weights", str(path), "--device", "cpu", *overrides_args(TINY_TIMM)],
                              monkeypatch)
    assert code == 0, err
    assert "passed" in out and "224 px: pooled (32,), tokens (196, 32)" in out and "one channel: model.patch_embed.proj" in out
    receipt = json.loads((tmp_path / "tiny.safetensors.medfm-check.json").read_text())
    assert receipt["passed"] and receipt["weights"]["sha256"] == sha256_file(path) and receipt["failures"] == []
    assert receipt["layers"]["count"] == 2 and receipt["seconds_per_image"] > 0
    assert receipt["one_channel"]["max_abs_error_vs_rgb_with_zero_gb"] <= 1e-4


@pytest.mark.parametrize(("case", "message"), [
    ("renamed", r'Missing key\(s\) in state_dict: "blocks.0.attn.qkv.weight". Unexpected key\(s\) in state_dict: "blocks.0.attn.qkv_v2.weight"'),
    ("other size", r"size mismatch for cls_token: copying a param with shape torch.Size\(\[1, 1, 48\]\)"),
    ("wrong readout", r"pooled features differ from the reference: max abs error .* > bound .* \(readout: the mean of the patch tokens"),
])
def test_check_backbone_fails_in_one_line_naming_the_problem(case: str, message: str, tmp_path: Path, monkeypatch) -> None:
    overrides = dict(TINY_TIMM)
    if case == "other size":
        path = timm_file(tmp_path / "w.safetensors", embed_dim=48)
    else:
        path = timm_file(tmp_path / "w.safetensors")
    if case == "renamed":
        from safetensors.torch import load_file

        state = load_file(path)
        state["blocks.0.attn.qkv_v2.weight"] = state.pop("blocks.0.attn.qkv.weight")
        save_file(state, path)
    if case == "wrong readout":  # a test hook: medfm deliberately reads the mean where the model pools its CLS token
        overrides["readout"] = "mean"
    code, out, err = run_main(main, ["check-backbone", VIT, "--weights", str(path), "--device", "cpu", *overrides_args(overrides)],
                              monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"error: check failed for {VIT}: ") and "Traceback" not in out + err, err
    assert re.search(message, lines[-1]), lines[-1]
    receipt = json.loads((tmp_path / "w.safetensors.medfm-check.json").read_text())
    assert receipt["passed"] is False and receipt["weights"]["sha256"] == sha256_file(path)


def test_check_backbone_fails_on_an_hf_folder_whose_weights_miss_a_tensor(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    folder = dinov2_folder(tmp_path / "dinov2-tiny")
    state = load_file(folder / "model.safetensors")
    state["encoder.layer.0.mlp.fc9.weight"] = state.pop("encoder.layer.0.mlp.fc1.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_main(main, ["check-backbone", f"hf:{folder}", "--device", "cpu"], monkeypatch)
    assert code == 2 and "missing: encoder.layer.0.mlp.fc1.weight" in err.strip().splitlines()[-1], err


def test_check_backbone_refuses_a_registry_name_in_one_line(monkeypatch) -> None:
    code, _, err = run_main(main, ["check-backbone", "deit"], monkeypatch)
    assert code == 2 and err.startswith("error: check-backbone compares a backbone named by its library")
