"""The study's training recipe, in one place for probe, finetune and their command lines (docs/protocol.md §5, §6).

- `STUDY`: AdamW lr 1e-4, weight decay 1e-5 on weights only (`param_groups`), batch 64, 100 epochs, gradient
  clipping 1.0, linear warmup over min(5 epochs, 1000 steps) then a constant learning rate
  (`warmup_then_constant`). The study warms up 5 epochs on APTOS and DDSM and 1000 steps on ISIC and CheXpert;
  the one rule gives both.
- `ADAPTER_RECIPES`: what an adapter (LoRA, DoRA, IA3; `training.adapters`) adds to it: its parameters' learning rate,
  rank, scale and dropout.
- `improves`: the model-selection rule of both stages (validation every epoch, strictly higher wins; under
  `protocol="study"` the official rule: 3-decimal rounding, best starting at 0.0).
- `PROTOCOLS`: "medfm" (medfm's behaviour) or "study" (the official code's, where the two differ; docs/protocol.md §7).
- `precision`: the precision policy of both stages: training and validation under autocast on CUDA,
  the test split always in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache.schema import PROTOCOLS  # noqa: F401  (PROTOCOLS re-exported)
from common.errors import MedfmError
from common.precision import Precision, for_protocol, resolve_precision

if TYPE_CHECKING:  # torch loads on use: the command lines take their defaults from here and stay quick
    import numpy as np
    import torch
    from torch import nn
    from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class Recipe:
    """An optimisation recipe; `STUDY` is the study's, and every default in probe and finetune points at it."""

    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    grad_clip: float
    warmup_epochs: int
    warmup_max_steps: int

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of linear warmup: `warmup_epochs` epochs, at most `warmup_max_steps`."""
        return min(self.warmup_epochs * max(steps_per_epoch, 0), self.warmup_max_steps)


STUDY = Recipe(lr=1e-4, weight_decay=1e-5, batch_size=64, epochs=100, grad_clip=1.0, warmup_epochs=5, warmup_max_steps=1000)


@dataclass(frozen=True)
class AdapterRecipe:
    """An adapter's defaults (docs/protocol.md §9), beside the study's recipe, which everything else keeps: the learning
    rate of the adapter's own parameters (the head trains at `STUDY.lr`, as in the study's scenarios) and, for the
    low-rank methods, rank, scale (alpha) and dropout. Adapters start at or next to the identity, with a few parameters
    per layer, and take larger steps than full weights do: LoRA practice trains them at 1e-4..5e-3, IA3 higher."""

    lr: float
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None


ADAPTER_RECIPES = {  # every method of `ledger.records.ADAPTERS`
    "lora": AdapterRecipe(lr=1e-3, r=8, alpha=16.0, dropout=0.1),
    "dora": AdapterRecipe(lr=1e-3, r=8, alpha=16.0, dropout=0.1),
    "ia3": AdapterRecipe(lr=3e-3),
}


def param_groups(model: nn.Module, weight_decay: float, own_lr: Mapping[str, float] | None = None) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases plus every 1-D parameter (norms) without decay. `own_lr` (parameter
    name -> learning rate: an adapter's) puts the parameters it names into groups of that rate, after the two."""
    groups: dict[tuple[float | None, bool], list] = {(None, True): [], (None, False): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = not (param.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault(((own_lr or {}).get(name), decayed), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0} | ({} if lr is None else {"lr": lr})
            for (lr, decayed), params in groups.items()]


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """LR rises linearly over `warmup_steps` optimizer steps (call `.step()` after each), then stays constant."""
    from torch.optim.lr_scheduler import LambdaLR

    warmup_steps = max(0, int(warmup_steps))
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)


def selection_rows(rows: int, seed: int, epoch: int, protocol: str = "medfm", batch_size: int = STUDY.batch_size) -> np.ndarray | None:
    """The validation rows an epoch is scored on for model selection: None (every row) under medfm's protocol; under
    the study's, what its validation loader served (shuffled, batches of 64, the last partial batch dropped): a seeded
    draw of rows // 64 * 64 rows, a new one each epoch (APTOS: 512 of 549). A split smaller than one batch is scored
    whole, as the train split is then served as one batch."""
    import numpy as np

    if protocol != "study" or rows <= batch_size:
        return None
    order = np.random.default_rng([seed, epoch, 0x5E1EC7]).permutation(rows)
    return np.sort(order[: rows // batch_size * batch_size])


def improves(score: float, best: float | None, protocol: str = "medfm") -> bool:
    """Whether this epoch's validation score replaces the best so far (`best`: the score of the epoch kept so far,
    None before the first epoch).

    "medfm": the first epoch is the best so far whatever its score; after it, a strictly greater score wins,
    an undefined (NaN) score never wins and any finite score beats an undefined best.

    "study": the official rule (the trainer of github.com/joanaapa/Foundation-Medical, its metrics rounded by
    `round(numpy_float, 3)`): the score rounded to 3 decimals must be strictly greater than the best so far, and
    the best starts at 0.0. So an epoch whose rounded score is <= 0 (or NaN) is never selected, and an epoch within
    rounding of the best does not replace it. If no epoch is ever selected the study had no selected weights;
    here the first epoch is kept instead: it is accepted provisionally (True when `best` is None), and the first
    epoch whose rounded score beats max(0.0, rounded best) replaces it, exactly as the study selects from then on.
    """
    if best is None:
        return True
    if protocol == "study":
        floor = _round3(best) if math.isfinite(best) else 0.0
        return math.isfinite(score) and _round3(score) > max(floor, 0.0)
    return math.isfinite(score) and (not math.isfinite(best) or score > best)


def _round3(value: float) -> float:
    """numpy's `round(x, 3)` on a float64 (the study's metrics are numpy floats): x * 1000, half to even, / 1000."""
    return round(value * 1000.0) / 1000.0


AMP_DTYPES = ("auto", "bf16", "fp16")


def precision(device: torch.device, amp: bool | None = None, dtype: str = "auto", protocol: str = "medfm") -> Precision:
    """The training stages' view of the one precision policy (`common.precision`, docs/protocol.md §6): `amp` None is
    on for CUDA and off on the CPU; `dtype` auto is the policy's own choice (bf16 where the GPU has it, else fp16 with
    a GradScaler), and under `--protocol study` the study's (fp16 with a GradScaler, training and validation alike);
    bf16 or fp16 asks for one of the two on any GPU. Asked for on the CPU, amp means bf16."""
    if dtype not in AMP_DTYPES:
        raise MedfmError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
    if not (device.type == "cuda" if amp is None else amp):
        return resolve_precision("fp32", device)
    dtype = for_protocol(dtype, protocol, device)
    if dtype == "auto" and device.type != "cuda":
        dtype = "bf16"
    return resolve_precision(dtype, device)
