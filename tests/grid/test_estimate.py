"""The GPU-hours estimate: each model's FLOPs counted on the model itself, times passes over the images, over the card's
sustained rate; any backbone a stage takes gets one, and one that cannot be counted is said, never fatal."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import MedfmError
from grid import estimate
from grid.cli import main
from grid.estimate import CARD, SplitSizes, count_model, finetune_hours
from grid.plan import GridSpec, plan
from tests.tiny import TINY_VIT, run_main

TIMM_VIT = "timm:vit_small_patch16_224"
TINY = tuple(f"{k}={v}" for k, v in TINY_VIT.items())


def test_a_models_flops_are_counted_on_the_model_at_its_input_size() -> None:
    """DeiT-B/16 at 224 px is the published 17.6 GMACs (35.1 GFLOPs); DINOv2's /14 patches give 256 tokens, not 196."""
    deit, dinov2 = count_model("deit"), count_model("dinov2")
    assert (deit.image_size, deit.tokens, deit.token_dim) == (224, 196, 768) and deit.flops / 1e9 == pytest.approx(35.1, rel=0.01)
    assert dinov2.tokens == 256 and dinov2.flops > deit.flops
    assert deit.head_flops / 1e9 == pytest.approx(35.0, rel=0.02)  # the DeiT-B head on 196 tokens: a DeiT-B without its stem


def test_hours_scale_with_the_images_the_passes_and_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    small = count_model(TIMM_VIT, 32, TINY)
    deeper = count_model(TIMM_VIT, 32, (*TINY[:1], "depth=4", *TINY[2:]))
    larger = count_model(TIMM_VIT, 64, TINY)
    n_tokens, dim = small.tokens + 1, small.token_dim  # two more ViT blocks: their matmuls and attention over 4 patches + CLS
    assert deeper.flops - small.flops == 2 * (24 * n_tokens * dim**2 + 4 * n_tokens**2 * dim) and larger.flops > 3 * small.flops
    monkeypatch.setitem(estimate.SPLIT_SIZES, "twice", SplitSizes(2 * 2564, 2 * 549, 2 * 549))
    once = finetune_hours(small, "aptos2019", "linear", False, 10)
    n = estimate.SPLIT_SIZES["aptos2019"]
    assert once == pytest.approx((10 * (3 * n.train + n.val) + n.test) * small.flops / CARD.flops_per_s / 3600)
    assert finetune_hours(small, "twice", "linear", False, 10) == pytest.approx(2 * once)
    assert finetune_hours(deeper, "aptos2019", "linear", False, 10) == pytest.approx(once * deeper.flops / small.flops)
    assert finetune_hours(small, "aptos2019", "linear", True, 10) < once < finetune_hours(small, "aptos2019", "deit", False, 10)
    assert finetune_hours(small, "mine", "linear", False, 10) is None  # data of unknown size


def test_a_library_backbone_is_planned_and_estimated_beside_the_studys_rows(tmp_path: Path) -> None:
    s = GridSpec(backbones=("deit", TIMM_VIT, "deit"), datasets=("aptos2019",), protocol="medfm", overrides=TINY,
                 extract_args=("--image-size", "32"), finetune_args=("--image-size=32",), output=str(tmp_path / "out"))
    p = plan(s, tmp_path / "grid")
    assert s.backbones == ("deit", TIMM_VIT) and len(p.cells) == 8
    assert [c.image_size for c in p.costs.values()] == [32, 32] and p.uncounted == {}
    assert all(p.hours[j.name] > 0 for j in p.jobs)
    assert {j.name for j in p.jobs if f"--backbone {TIMM_VIT}" in " ".join(j.args)} == {
        f"extract-{TIMM_VIT}-aptos2019", f"probe-{TIMM_VIT}-aptos2019", f"finetune-unfrozen-linear-{TIMM_VIT}-aptos2019-s0",
        f"finetune-unfrozen-deit-{TIMM_VIT}-aptos2019-s0"}


def test_a_model_that_cannot_be_counted_is_said_in_the_dry_run_and_the_rest_is_estimated(tmp_path, monkeypatch) -> None:
    counted = estimate.count_model

    def count(backbone: str, *args):
        if backbone == "dino":
            raise MedfmError("cannot count dino's FLOPs on the meta device (RuntimeError: no meta kernel)")
        return counted(backbone, *args)

    monkeypatch.setattr(estimate, "count_model", count)
    args = ["run", "--dry-run", "--backbones", "deit,dino", "--datasets", "aptos2019,ham10000", "--protocol", "medfm",
            "--scenarios", "unfrozen-linear", "--grid", str(tmp_path / "g"), *[a for o in TINY for a in ("--override", o)]]
    code, out, err = run_main(main, args, monkeypatch)
    lines = out.splitlines()
    assert code == 0 and err == "" and lines[2].endswith("; 3 jobs not counted"), out
    assert lines[3].startswith("  deit: ") and " GFLOPs per image at 224 px, " in lines[3]
    assert lines[4:] == ["  dino: no estimate, cannot count dino's FLOPs on the meta device (RuntimeError: no meta kernel)",
                         "  ham10000: no estimate, data of unknown size"]


def test_counting_a_model_that_will_not_build_is_one_line() -> None:
    with pytest.raises(MedfmError, match=f"^cannot count {TIMM_VIT}'s FLOPs: timm vit_small_patch16_224 does not take these settings"):
        count_model(TIMM_VIT, None, ("no_such_option=1",))
