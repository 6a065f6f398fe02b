"""One precision policy (`common.precision`) for extraction and training, and `--protocol study` implying the study's:
fp16 autocast with a GradScaler for training and validation, fp16 extraction, recorded in each run. The device is
mocked at the policy level: these machines have no GPU."""

from __future__ import annotations

import json

import pytest
import torch

from cache.layout import open_cache
from common.errors import MedfmError
from common.precision import autocast_dtype, for_protocol, resolve_precision
from probe.config import TrainConfig
from probe.run import run_probe
from tests.probe.caches import make_cache
from tests.tiny import QUIET
from training import recipe

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_is_bf16_on_a_gpu_that_has_it_else_fp16_and_fp32_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", CUDA) is torch.bfloat16 and recipe.precision(CUDA).describe() == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # one rule for both stages
    assert autocast_dtype("auto", CUDA) is torch.float16 and recipe.precision(CUDA).describe() == "fp16 + GradScaler"
    assert autocast_dtype("auto", CPU) is None and recipe.precision(CPU).describe() == "fp32"
    with pytest.raises(MedfmError, match="^--precision must be one of auto, fp32, bf16, fp16, got 'fp8'$"):
        autocast_dtype("fp8", CPU)


def test_the_study_protocol_implies_fp16_with_a_scaler_on_cuda_and_leaves_what_is_asked_for(bf16_gpu) -> None:
    study = recipe.precision(CUDA, protocol="study")
    assert study.dtype is torch.float16 and study.needs_scaler and study.describe() == "fp16 + GradScaler"
    assert autocast_dtype(for_protocol("auto", "study", CUDA), CUDA) is torch.float16  # the extraction's
    assert recipe.precision(CUDA, protocol="medfm").dtype is torch.bfloat16  # medfm's own default stays
    assert recipe.precision(CUDA, dtype="bf16", protocol="study").dtype is torch.bfloat16  # asked for: kept
    assert autocast_dtype(for_protocol("bf16", "study", CUDA), CUDA) is torch.bfloat16
    assert recipe.precision(CPU, protocol="study").dtype is None and for_protocol("auto", "study", CPU) == "fp32"
    assert resolve_precision("fp16", CPU).dtype is torch.float16  # an explicit fp16 is honoured anywhere


def test_a_study_probe_run_on_a_gpu_records_fp16_with_a_scaler(isolated_outputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe asks the policy for the device's precision; told the device is a GPU, it trains and validates under fp16
    autocast with a GradScaler (CPU autocast runs the same code) and its config.json says so."""
    import probe.train

    asked = []

    def as_if_cuda(device: torch.device, amp=None, dtype: str = "auto", protocol: str = "medfm"):
        asked.append(protocol)
        return recipe.precision(CUDA, amp, dtype, protocol)

    monkeypatch.setattr(probe.train, "precision", as_if_cuda)
    cache = make_cache(isolated_outputs / "c.h5")
    with open_cache(cache, None, None) as reader:
        study = run_probe(reader, TrainConfig(epochs=2, batch_size=16, lr=1e-2, protocol="study"), console=QUIET).record
        medfm = run_probe(reader, TrainConfig(epochs=2, batch_size=16, lr=1e-2, protocol="medfm", seed=1, solver="adamw"), console=QUIET).record
    assert asked == ["study", "medfm"]
    recorded = [json.loads((isolated_outputs.parent / r.run_dir / "config.json").read_text())["extra"]["precision"] for r in (study, medfm)]
    assert recorded[0] == "fp16 + GradScaler" and recorded[1] in ("bf16", "fp16 + GradScaler")
