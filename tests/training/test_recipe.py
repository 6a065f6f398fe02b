"""The study's optimisation pieces: no weight decay on biases and 1-D params, warmup then constant LR."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.errors import MedfmError
from probe.config import TrainConfig
from probe.run import validate
from training.recipe import PROTOCOLS, improves, param_groups, precision, warmup_then_constant


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
    with pytest.raises(MedfmError, match="^--protocol must be medfm or study"):  # checked where it enters, not per epoch
        validate(TrainConfig(protocol="paper"))


def test_the_precision_policy_takes_the_asked_dtype_on_a_gpu_and_keeps_the_cpu_in_fp32() -> None:
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert precision(cuda, dtype="fp16").dtype is torch.float16 and precision(cuda, dtype="fp16").needs_scaler
    assert precision(cuda, dtype="bf16").dtype is torch.bfloat16 and not precision(cuda, dtype="bf16").needs_scaler
    assert precision(cuda, amp=False, dtype="fp16").dtype is None  # --no-amp wins
    assert precision(torch.device("cpu"), dtype="fp16").dtype is None  # amp is off on the CPU unless asked
    with pytest.raises(MedfmError, match="--amp-dtype must be one of auto, bf16, fp16"):
        precision(cuda, dtype="half")
