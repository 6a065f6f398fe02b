"""`--token-dtype int8`: tokens leave the device as int8 with one float32 scale per token, within half a scale of the
float tokens, in a cache of their own fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache.store import CacheReader
from common.errors import MedfmError
from extract.runner import extract, quantize
from tests.extract.extractions import config
from tests.tiny import QUIET


def test_quantize_keeps_each_value_within_half_a_scale_and_zero_tokens_at_zero() -> None:
    tokens = torch.randn(3, 5, 16) * torch.logspace(-3, 3, 5)[None, :, None]
    tokens[1, 2] = 0
    values, scales = quantize(tokens)
    assert values.dtype == torch.int8 and scales.shape == (3, 5) and int(values.abs().max()) == 127
    assert bool(((values.float() * scales[..., None] - tokens).abs() <= scales[..., None] / 2 * (1 + 1e-5)).all())
    assert float(scales[1, 2]) == 1.0 and not values[1, 2].any()


def test_int8_tokens_are_the_float_tokens_quantized_per_token_in_their_own_cache(tmp_path: Path) -> None:
    floats = extract(config(tmp_path, token_dtype="float32", views=0, augment="none"), QUIET).path
    int8 = extract(config(tmp_path, token_dtype="int8", views=0, augment="none"), QUIET).path
    assert floats != int8
    with CacheReader(floats) as f, CacheReader(int8) as q:
        assert q.meta.settings["token_dtype"] == "int8" and q.fingerprint != f.fingerprint
        for split in q.splits:
            assert q.dataset(split, "tokens").dtype == np.int8 and q.scales(split, "tokens") == "scale/tokens"
            scales = q.read_rows(split, "scale/tokens", 0, len(q.ids(split)))
            error = np.abs(q.features(split, "tokens") - f.features(split, "tokens"))
            assert (error <= scales[..., None] / 2 * (1 + 1e-5) + 1e-7).all()
            np.testing.assert_array_equal(q.features(split, "pooled"), f.features(split, "pooled"))


def test_an_unknown_token_dtype_is_one_line_naming_int8(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="--token-dtype must be one of float16, float32, int8, got int4"):
        extract(config(tmp_path, token_dtype="int4"), QUIET)
