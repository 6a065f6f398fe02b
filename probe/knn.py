"""The k-nearest-neighbour probe (`probe run --head knn`, scenario `frozen-knn`): no training loop, no weights.

DINO's kNN evaluation (Caron et al. 2021, `eval_knn.py`): pooled features are L2-normalised, a query's neighbours
are the train rows of highest cosine similarity, and each of its k nearest neighbours votes for its class with
weight exp(sim / T), T = 0.07. A class's score is the sum of its neighbours' weights; the stored logits are the log
of the scores normalised to sum 1 (floored at `FLOOR`, so a class with no vote has a finite logit and stored
predictions, metrics and intervals work unchanged). k is chosen among `KS` (those not above the train size) on
validation by the primary metric (`training.recipe.improves`, so the smallest k wins a tie); the test split is
scored once with that k.

Memory: the normalised features of each split are held once ([N, D] float64); queries are compared with the train
rows in blocks of `block_rows(N_train)` rows, so the similarity block ([rows, N_train] float64) never exceeds
`BLOCK_BYTES` (64 MiB) however large the query split: never N_query x N_train at once. Similarities are computed in
float64 and rounded to float32, so the block size does not change a single bit of the result (a matrix product's
rounding depends on its shape; the rounding to float32 absorbs that).

Single-label tasks only: kNN voting picks one class, so a multilabel task is refused in one line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cache.schema import Task
from common.errors import MedfmError
from probe.config import FitResult, TrainConfig
from probe.data import FeatureSource
from scoring.metrics import compute_metrics, primary_score
from training.heads import HeadSpec, fit_only, register_head
from training.recipe import improves

if TYPE_CHECKING:
    from rich.progress import Progress

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
BLOCK_BYTES = 64 * 2**20  # the bound on one block of similarities (float32)
FLOOR = 1e-12  # smallest normalised class score whose log is stored (a class without votes)


def block_rows(n_train: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Query rows per block so that a block of float64 similarities [rows, n_train] fits in `block_bytes`."""
    return max(1, block_bytes // (8 * max(n_train, 1)))


def candidate_ks(n_train: int) -> list[int]:
    """The values of k tried: those of `KS` not above the train size (the train size itself when it is below 10)."""
    ks = [k for k in KS if k <= n_train]
    return ks or [n_train]


def _features(source: FeatureSource, split: str, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """Every valid row of `split`, L2-normalised float64 [N, D], and their labels."""
    xs, ys = [], []
    for batch in source.eval_batches(split):
        xs.append(torch.from_numpy(np.ascontiguousarray(batch.features)).to(device, torch.float64).flatten(1))
        ys.append(batch.labels)
    return F.normalize(torch.cat(xs), dim=1), np.concatenate(ys)


@torch.no_grad()
def neighbours(queries: torch.Tensor, train: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` most similar train rows of each query, most similar first: cosine similarities and indices [N, k]
    (float64 inputs; similarities rounded to float32).
    Queries go `block` rows at a time, so at most [block, N_train] similarities exist at once."""
    sims, idx = [], []
    for start in range(0, len(queries), block):
        s = (queries[start : start + block] @ train.T).float()  # float64 products rounded: the same bits in any block
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def vote(sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, k: int, classes: int,
         temperature: float = TEMPERATURE) -> np.ndarray:
    """Logits [N, C]: log of the normalised class scores of the first `k` neighbours, each weighing exp(sim / T)."""
    weights = (sims[:, :k].double() / temperature).exp()
    scores = torch.zeros(len(sims), classes, dtype=torch.float64, device=sims.device)
    scores.scatter_add_(1, train_labels[idx[:, :k]], weights)
    probs = scores / scores.sum(dim=1, keepdim=True)
    return probs.clamp_min(FLOOR).log().cpu().numpy()


def fit_knn(config: TrainConfig, source: FeatureSource, task: Task, device: torch.device, progress: Progress | None = None,
            block_bytes: int = BLOCK_BYTES) -> FitResult:
    """Choose k on validation and score the test split once with it; a `FitResult` as a trained head's."""
    if task.kind == "multilabel":
        raise MedfmError("--head knn is for single-label tasks (kNN voting picks one class); this cache's task is multilabel")
    start = time.perf_counter()
    train, train_y = _features(source, "train", device)
    labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)
    ks = candidate_ks(len(train))
    block = block_rows(len(train), block_bytes)
    found = {split: (*neighbours(q, train, max(ks), block), y) for split in ("val", "test") for q, y in [_features(source, split, device)]}
    classes = task.num_outputs
    best: dict | None = None
    history = []
    sims, idx, val_y = found["val"]
    for k in ks:
        logits = vote(sims, idx, labels, k, classes)
        score = primary_score(task, val_y, logits)
        history.append({"k": k, f"val_{task.primary_metric}": score})
        if improves(score, None if best is None else best["score"], config.protocol):
            best = {"k": k, "score": score, "logits": logits}
    assert best is not None
    sims, idx, test_y = found["test"]
    test_logits = vote(sims, idx, labels, best["k"], classes)
    seconds = time.perf_counter() - start
    state = {"k": torch.tensor(best["k"]), "temperature": torch.tensor(TEMPERATURE)}
    result = FitResult(config, 0, best["score"], compute_metrics(task, val_y, best["logits"]), compute_metrics(task, test_y, test_logits),
                       history, state, seconds, "", {"val": (val_y, best["logits"].astype(np.float32)),
                                                     "test": (test_y, test_logits.astype(np.float32))})
    result.extra = {"k": best["k"], "temperature": TEMPERATURE, "ks": ks}
    return result


register_head(HeadSpec(
    name="knn", reads="pooled", build=fit_only("knn"), fit=fit_knn,
    description="k nearest train neighbours by cosine similarity, DINO's weighted vote; k chosen on validation (not in the study)",
))
