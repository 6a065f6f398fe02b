"""`protocol="study"` in probe: the DeiT head's per-forward position embedding and the official model-selection rule,
each checked against a small re-implementation written here from the official code
(github.com/joanaapa/Foundation-Medical @ a7aa194); each test fails if the rule is not applied."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from common.errors import MedfmError
from training.heads import DeiTHead, LinearHead, build_head
from training.recipe import improves


def official_interpolate_pos_encoding(x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """`VisionTransformer.interpolate_pos_encoding` of the official utils/transformers/deit.py."""
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N:
        return pos_embed
    class_emb = pos_embed[:, 0]
    pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    pos_embed = F.interpolate(
        pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=math.sqrt(npatch / N),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    pos_embed = pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_emb.unsqueeze(0), pos_embed), dim=1)


def official_head(head: DeiTHead, tokens: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The official appended DeiT: projector, DeiT's `forward_features` with `patch_embed = Identity` (own CLS,
    position embedding interpolated per forward, blocks, final norm, CLS), then the linear classifier.
    `pos_embed` replaces the interpolated table by a fixed one."""
    x = head.project(tokens)
    x = torch.cat((head.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + (official_interpolate_pos_encoding(x, head.pos_embed) if pos_embed is None else pos_embed)
    for block in head.blocks:
        x = block(x)
    return head.classifier(head.norm(x)[:, 0])


def randomize_(head: DeiTHead) -> DeiTHead:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.pos_embed.copy_(torch.randn(head.pos_embed.shape, generator=gen))
    return head.eval()


@pytest.mark.parametrize("side", [4, 7, 16, 14], ids=["4x4", "7x7 (SEEM, ResNet)", "16x16 (DINOv2)", "14x14 (native)"])
def test_study_deit_head_interpolates_the_native_table_at_every_forward(side: int) -> None:
    study = randomize_(build_head("deit", (side * side, 8), 3, protocol="study", depth=1, preset="deit-t", weights="random"))
    medfm = randomize_(build_head("deit", (side * side, 8), 3, depth=1, preset="deit-t", weights="random"))
    assert study.pos_embed.shape == (1, 197, 192)  # the 14 x 14 table is the parameter
    tokens = torch.randn(2, side * side, 8)
    with torch.no_grad():
        ours = study(tokens)
        expected = official_head(study, tokens)
        once = resample_abs_pos_embed(study.pos_embed, new_size=[side, side], old_size=[14, 14], num_prefix_tokens=1)
        resampled_once = official_head(study, tokens, pos_embed=once)  # medfm's table, with the same weights
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    if side == 14:
        assert torch.equal(ours, resampled_once) and medfm.pos_embed.shape == (1, 197, 192)
    else:
        assert medfm.pos_embed.shape == (1, side * side + 1, 192)
        table = official_interpolate_pos_encoding(torch.zeros(1, side * side + 1, 192), study.pos_embed)
        assert (once - table).norm() > 0.01 * table.norm()  # antialiased (medfm) vs plain bicubic (the study)
        assert not torch.allclose(ours, resampled_once, atol=1e-5, rtol=1e-5)


def test_study_deit_head_trains_the_14x14_table() -> None:
    head = randomize_(build_head("deit", (49, 8), 2, protocol="study", depth=1, preset="deit-t", weights="random")).train()
    tokens = torch.randn(4, 49, 8)
    head(tokens).sum().backward()
    ours = head.pos_embed.grad.clone()
    head.zero_grad()
    official_head(head, tokens).sum().backward()
    assert ours.shape == (1, 197, 192) and ours[0, 1:].abs().sum() > 0
    torch.testing.assert_close(ours, head.pos_embed.grad, atol=1e-6, rtol=1e-5)


def test_study_deit_head_refuses_a_grid_the_official_rule_cannot_make() -> None:
    with pytest.raises(MedfmError, match="square"):
        DeiTHead(8, 2, depth=1, preset="deit-t", weights="random", grid=(4, 8), protocol="study")
    head = build_head("deit", (16, 8), 2, protocol="study", depth=1, preset="deit-t", weights="random")
    with pytest.raises(MedfmError, match="grid"):
        head(torch.randn(1, 25, 8))


def test_every_head_builder_takes_the_protocol_and_an_unknown_one_is_refused() -> None:
    assert isinstance(build_head("linear", (16,), 3, protocol="study"), LinearHead)  # nothing to switch
    with pytest.raises(MedfmError, match="^--protocol must be medfm or study"):
        build_head("linear", (16,), 3, protocol="paper")
    with pytest.raises(MedfmError, match="^--protocol must be medfm or study"):
        build_head("deit", (4, 8), 2, protocol="paper", depth=1, preset="deit-t", weights="random")


# --- model selection -----------------------------------------------------------------------------------------------


def official_selection(scores: list[float]) -> int | None:
    """The official trainer: each epoch's metric is `round(numpy_float, 3)` (utils/metrics.py); it is kept when
    `val_target > best_val_target`, which starts at 0.0 (defaults/trainer.py, defaults/bases.py). None: no epoch."""
    best, chosen = 0.0, None
    for epoch, score in enumerate(scores):
        val_target = round(np.float64(score), 3)
        if val_target > best:
            best, chosen = val_target, epoch
    return chosen


def selected(scores: list[float], protocol: str) -> int:
    """The epoch a training loop keeps with `improves`, fed as probe and finetune feed it."""
    best: float | None = None
    chosen = -1
    for epoch, score in enumerate(scores):
        if improves(score, best, protocol):
            best, chosen = score, epoch
    return chosen


def curves(count: int) -> list[list[float]]:
    """Validation curves that plateau within rounding, dip below zero (kappa), hit exact halves, or are undefined."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        level, scores = rng.uniform(-0.2, 0.9), []
        for _ in range(rng.randint(1, 12)):
            level += rng.gauss(0, 0.002) if rng.random() < 0.7 else rng.gauss(0, 0.05)
            pick = rng.random()
            scores.append(math.nan if pick < 0.05 else round(level, 4) + 0.0005 if pick < 0.15 else level)
        out.append(scores)
    return out + [[-0.1, -0.05], [0.0004, 0.0003], [math.nan, 0.2], [0.5, 0.5004, 0.5006], [0.7, math.nan, 0.69]]


def test_study_selection_is_the_official_rule() -> None:
    cases = curves(2000)
    differ = 0
    for scores in cases:
        official = official_selection(scores)
        assert selected(scores, "study") == (0 if official is None else official), scores  # none selected: the first
        differ += selected(scores, "medfm") != selected(scores, "study")
    assert differ > 100  # the default rule (unrounded, no 0.0 floor) picks other epochs: the test sees the rule


def test_study_selection_in_words() -> None:
    assert improves(0.5, None, "study")  # the first epoch is kept until one is selected
    assert not improves(0.5004, 0.5, "study")  # equal once rounded: not strictly greater
    assert improves(0.5006, 0.5, "study")
    assert not improves(0.0004, -0.3, "study")  # rounded to 0.0, never above the 0.0 start
    assert improves(0.001, -0.3, "study")
    assert not improves(math.nan, 0.2, "study")
    assert improves(0.5004, 0.5) and improves(0.0004, -0.3)  # medfm: unrounded, no floor
