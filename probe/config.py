"""A head's training settings (`TrainConfig`) and its outcome (`FitResult`): what the loop, kNN and zero-shot share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from probe.solvers import C_GRID, default_solver
from scoring.metrics import Metrics
from training.heads import get_head
from training.recipe import STUDY

if TYPE_CHECKING:
    from probe.subsets import Subset


# what only the AdamW loop reads: an lbfgs fit (always on standardized features, the eval view) does not depend on them
ADAMW_ONLY = ("lr", "weight_decay", "batch_size", "epochs", "warmup_steps", "patience", "grad_clip", "data_seed", "standardize",
              "views")


@dataclass(frozen=True)
class TrainConfig:
    """One head's training settings. Heads trained together in one pass share all but head/lr/wd/seed/head_*."""

    head: str = "linear"  # a name in the head registry (training.heads)
    feature: str = "pooled"  # the cache array: pooled, tokens, pooled@K, tokens@K
    lr: float = STUDY.lr
    weight_decay: float = STUDY.weight_decay
    batch_size: int = STUDY.batch_size
    epochs: int = STUDY.epochs
    warmup_steps: int | None = None  # None: the study's, STUDY.warmup_steps(steps per epoch)
    patience: int | None = None  # early stopping on validation; None trains every epoch (the study)
    grad_clip: float | None = STUDY.grad_clip
    seed: int = 0  # head initialisation
    data_seed: int = 0  # batch order
    head_depth: int = 12
    head_preset: str = "deit-b"
    head_weights: str = "default"
    standardize: bool = False  # linear heads: standardize features with train mean/std (MAE-style); not the study
    views: int = 0  # augmented train views of the cache to cycle, epoch e on view (e-1) mod K; 0: the eval view (docs/protocol.md §4)
    protocol: str = "medfm"  # medfm | study: model selection and DeiT-head rules (docs/protocol.md §7)
    train_subset: Subset | None = None  # a labelled subset of the train rows (probe.curve); None: every train row
    solver: str = "auto"  # linear heads: auto | lbfgs | adamw (probe.solvers); `resolved()` makes auto concrete
    c_grid: tuple[float, ...] = C_GRID  # lbfgs: the inverse L2 strengths tried, one chosen on validation (probe.logreg)
    folds: int = 0  # K-fold cross-validation over the pooled train and test rows (probe.folds); 0: the cache's own split
    fold: int = 0  # which fold this run tests on (0..folds-1)
    fold_groups: str | None = None  # the metadata column that groups rows across folds (a patient column), or None

    def head_options(self) -> dict[str, Any]:
        """The head's own settings (`head_<option>` fields), as its registry entry names them."""
        return {option: getattr(self, f"head_{option}") for option in get_head(self.head).options}

    def shared(self) -> tuple:
        """What heads must agree on to train in the same pass over the data."""
        return (self.feature, self.batch_size, self.epochs, self.warmup_steps, self.patience, self.grad_clip, self.data_seed,
                self.views, self.protocol, self.train_subset, self.folds, self.fold, self.fold_groups)

    def resolved(self) -> TrainConfig:
        """This config with `solver` auto made concrete (`probe.solvers.default_solver`): lbfgs for the linear head on the
        eval view under medfm's protocol, adamw otherwise."""
        if self.solver != "auto":
            return self
        return replace(self, solver=default_solver(self.head, self.protocol, self.views))

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the result (the ledger's config), for the resolved solver; head_* only for heads that
        use them. An lbfgs run records its solver and C grid, not the AdamW settings it never used; an AdamW run records
        no solver, so its ledger key is the one it had before the solver existed."""
        config = self.resolved()
        data = asdict(config)
        data.pop("seed")
        if config.solver == "lbfgs":
            for name in ADAMW_ONLY:
                data.pop(name)
            data["c_grid"] = list(config.c_grid)
        else:
            data.pop("solver")
            data.pop("c_grid")
            if self.head != "linear" or not self.standardize:
                data.pop("standardize")  # absent when off, so ledger keys of study-recipe runs do not depend on it
        if not self.folds:
            for name in ("folds", "fold", "fold_groups"):
                data.pop(name)  # absent without folds: the keys of earlier runs stay as they were
        if self.train_subset is None:
            data.pop("train_subset")  # absent when every train row is used: the keys of earlier runs stay as they were
        used = {f"head_{option}" for option in get_head(self.head).options}
        for key in [k for k in data if k.startswith("head_") and k not in used]:
            data.pop(key)
        return data


@dataclass
class FitResult:
    """One head's outcome: best-validation epoch and weights, their test metrics, per-epoch history."""

    config: TrainConfig
    best_epoch: int
    val_score: float
    val_metrics: Metrics
    test_metrics: Metrics
    history: list[dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    train_seconds: float
    head_init: str  # "random", the weights file of a DeiT head, or "" for a linear head
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (labels, logits) of the best epoch, in row order
    extra: dict[str, Any] = field(default_factory=dict)  # what else the run's metrics.json records (kNN: the chosen k)
    precision: str = "fp32"  # what training and validation ran in (`common.precision.Precision.describe`)
