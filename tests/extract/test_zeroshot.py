"""Zero-shot for OpenCLIP: `extract zeroshot` embeds class prompts with the model's own text tower into the cache,
`probe run --head zeroshot` scores them, equal to open_clip's own encode_image / encode_text path."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from cache.store import CacheReader, verify
from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.cli import main as extract_main
from extract.runner import ExtractConfig, extract, group_images
from extract.text import PROMPTS_FILE, ZeroShotConfig, build_clip, load_prompts, prompts_for, zeroshot
from extract.transforms import Normalize, TransformSpec
from ledger.predictions import load_predictions
from ledger.store import Ledger
from probe.cli import main as probe_main
from probe.config import TrainConfig
from probe.run import run_probe
from tests.tiny import QUIET, TINY_BACKBONES, run_main

VISION, SIZE = TINY_BACKBONES["openclip"][0], TINY_BACKBONES["openclip"][1]
TEXT = dict(width=16, heads=2, layers=1)  # a tiny text tower; vocabulary and context as ViT-B-16's (its tokenizer)
ZEROSHOT = TrainConfig(head="zeroshot")


def demo_cache(out: Path, backbone: str = "openclip", overrides: dict | None = None, size: int = SIZE) -> Path:
    config = ExtractConfig(backbone=backbone, dataset="demo", weights="random", image_size=size, batch_size=64, workers=0,
                           device="cpu", out=out, tokens=False, overrides=dict(VISION) if overrides is None else overrides,
                           dataset_options={"per_class": 6})
    return extract(config, QUIET).path


@pytest.fixture
def cache(isolated_outputs: Path) -> Path:
    return demo_cache(isolated_outputs / "features")


def test_clip_image_tower_is_the_backbone_seeded_alike() -> None:
    clip = build_clip(None, SIZE, TEXT, **VISION)
    image = create_backbone("openclip", "random", image_size=SIZE, **VISION).model.state_dict()
    assert clip.visual.state_dict().keys() == image.keys()
    assert all(torch.equal(clip.visual.state_dict()[k], image[k]) for k in image)
    again = build_clip(None, SIZE, TEXT, **VISION)  # the text tower is deterministic too
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), again.state_dict().values(), strict=True))


def test_zeroshot_logits_equal_open_clips_own_path(cache: Path) -> None:
    result = zeroshot(ZeroShotConfig(cache, text_overrides=TEXT, device="cpu"))
    outcome = run_probe(CacheReader(cache), ZEROSHOT, device="cpu", ledger=Ledger(), console=QUIET)
    assert outcome.record.scenario == "zero-shot" and outcome.record.head == "zeroshot"
    stored = load_predictions(outcome.record.run_dir, "test")

    # the reference: open_clip's CLIP built directly, the same seed and settings, on the images the cache saw
    torch.manual_seed(0)
    ref = open_clip.CLIP(VISION["embed_dim"], dict(image_size=SIZE, patch_size=16, width=32, layers=2, head_width=16),
                         dict(context_length=77, vocab_size=49408, **TEXT)).eval()
    with CacheReader(cache) as reader:
        meta, pooled = reader.meta, reader.features("test")
        assert list(reader.ids("test")) == list(stored.ids)
    tspec = TransformSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.transform.items()})
    from extract.datasets import get_dataset

    images = group_images(get_dataset("demo", None, per_class=6), "test", tspec, None, 0)
    x = Normalize(tspec)(torch.stack([images[i][0] for i in range(len(images))]))  # the loader's uint8 crops, normalised as on the device
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    templates, words = prompts_for(load_prompts(), "demo", meta.task.class_names)
    with torch.no_grad():
        image = F.normalize(ref.encode_image(x), dim=-1)
        text = torch.stack([F.normalize(F.normalize(ref.encode_text(tokenizer([t.format(w) for t in templates])), dim=-1).mean(0), dim=0)
                            for w in words])
        logits = (100 * image @ text.T).numpy()
    assert np.abs(F.normalize(torch.from_numpy(pooled), dim=-1).numpy() - image.numpy()).max() < 1e-5
    assert np.abs(result.classes - text.numpy()).max() < 1e-6
    diff = np.abs(stored.logits - logits).max()
    print(f"max |logit difference| = {diff:.3g}")
    assert diff < 1e-5
    assert verify(cache) == []


def test_cache_stays_sound_and_text_checksum_is_verified(cache: Path) -> None:
    zeroshot(ZeroShotConfig(cache, text_overrides=TEXT, device="cpu"))
    with CacheReader(cache) as reader:
        assert reader.groups == ["train", "val", "test"]  # `text` is no split
        text = reader.text_classes()
        assert text is not None and text.classes.shape == (4, VISION["embed_dim"]) and text.templates == tuple(load_prompts()["templates"]["demo"])
    with h5py.File(cache, "r+") as file:
        file["text"]["classes"][0, 0] += 1.0
    assert any(p.startswith("text") for p in verify(cache))
    with CacheReader(cache) as reader, pytest.raises(MedfmError, match="checksum"):
        reader.text_classes()


def test_prompts_file_overrides_and_class_words(cache: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"templates": {"default": ["an image of {}."]}, "classnames": {"demo": {"disc": "a round disc"}}}))
    result = zeroshot(ZeroShotConfig(cache, prompts=prompts, text_overrides=TEXT, device="cpu"))
    assert result.templates == ["an image of {}."] and result.words[0] == "a round disc"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": {"default": ["no placeholder"]}}))
    with pytest.raises(MedfmError, match="one \\{\\}"):
        zeroshot(ZeroShotConfig(cache, prompts=bad, text_overrides=TEXT, device="cpu"))
    assert set(load_prompts(PROMPTS_FILE)["templates"]) >= {"default", "aptos2019", "isic2019", "ddsm", "chexpert"}


def test_refusals_in_one_line(cache: Path, isolated_outputs: Path, monkeypatch) -> None:
    code, _, err = run_main(extract_main, ["zeroshot", "--backbone", "dinov2", "--dataset", "demo"], monkeypatch)
    assert code == 2 and "dinov2 has no text tower" in err and len(err.strip().splitlines()) == 1
    # a cache without the text group
    code, _, err = run_main(probe_main, ["run", "--head", "zeroshot", "--cache", str(cache), "--device", "cpu"], monkeypatch)
    assert code == 2 and "extract zeroshot" in err and len(err.strip().splitlines()) == 1
    # class count mismatch
    zeroshot(ZeroShotConfig(cache, text_overrides=TEXT, device="cpu"))
    with h5py.File(cache, "r+") as file:
        classes = file["text"]["classes"][:2]
        del file["text"]["classes"]
        file["text"].create_dataset("classes", data=classes)
        from cache.store import array_crc

        file["text"].attrs["crc32_classes"] = array_crc(classes)
    code, _, err = run_main(probe_main, ["run", "--head", "zeroshot", "--cache", str(cache), "--device", "cpu"], monkeypatch)
    assert code == 2 and "2 class text embeddings for 4 classes" in err


def test_extract_zeroshot_cli_finds_the_cache_by_its_options(cache: Path, isolated_outputs: Path, monkeypatch) -> None:
    # the command line has no text overrides: a full-size text tower on the tiny image tower, found by --cache
    code, out, err = run_main(extract_main, ["zeroshot", "--cache", str(cache), "--device", "cpu"], monkeypatch)
    assert code == 0, err
    with CacheReader(cache) as reader:
        assert reader.text_classes().classes.shape == (4, VISION["embed_dim"])
    code, _, err = run_main(extract_main, ["zeroshot", "--backbone", "openclip", "--dataset", "demo", "--weights", "random",
                                           "--opt", "per_class=3", "--device", "cpu"], monkeypatch)
    assert code == 2 and "run `extract run` with the same options first" in err
