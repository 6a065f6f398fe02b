"""The study's optimisation pieces: no weight decay on biases and 1-D params, warmup then constant LR."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.errors import MedfmError
from probe.recipe import PROTOCOLS, improves, param_groups, warmup_then_constant


def test_param_groups_exempt_biases_and_norms_from_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("pos", nn.Parameter(torch.zeros(1, 3, 4)))
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model.pos)}
    assert {id(p) for p in plain["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_warmup_rises_linearly_then_stays_constant():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_then_constant(opt, 4)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_improves_keeps_the_first_epoch_then_needs_a_strictly_greater_defined_score():
    assert improves(-0.4, None) and improves(math.nan, None)
    assert improves(0.5000001, 0.5) and not improves(0.5, 0.5) and not improves(math.nan, 0.5)
    assert improves(0.1, math.nan)  # any defined score beats an undefined best


def test_the_protocols_are_the_same_two_names_in_probe_and_extract_and_others_are_refused():
    from extract.backbones import PROTOCOLS as EXTRACT_PROTOCOLS

    assert PROTOCOLS == EXTRACT_PROTOCOLS == ("medfm", "study")
    with pytest.raises(MedfmError, match="^--protocol must be medfm or study"):
        improves(0.5, 0.4, "paper")
