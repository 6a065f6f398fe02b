"""The zero-shot head (`probe run --head zeroshot`, scenario `zero-shot`): CLIP's own classifier, no training.

The logits of a row are `100 * normalise(pooled) @ classes.T`, where `pooled` is the cached projected image embedding
of the last block and `classes` [C, D] the class text embeddings `extract zeroshot` stored in the cache's `text` group
(the mean of the normalised embeddings of each class's prompts, normalised). 100 is CLIP's logit scale. Validation and
test are scored as any head's; nothing is fitted. Single-label tasks only.
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

if TYPE_CHECKING:
    from rich.progress import Progress

LOGIT_SCALE = 100.0


def class_text(source: FeatureSource, task: Task) -> np.ndarray:
    """The cache's class text embeddings [C, D], or one line saying what is missing or does not fit."""
    reader = source.reader
    if task.kind == "multilabel":
        raise MedfmError("--head zeroshot: zero-shot here scores single-label tasks; this cache's task is multilabel")
    if source.feature != "pooled":
        raise MedfmError(f"--head zeroshot compares the last block's pooled (projected) embedding with the text, not {source.feature}; "
                         "leave --layer out")
    text = reader.text_classes()
    if text is None:
        raise MedfmError(f"cache {reader.path.name} holds no class text embeddings; run `extract zeroshot --cache {reader.path}` first")
    if len(text.classes) != len(task.class_names) or len(text.classes) != task.num_outputs:
        raise MedfmError(f"cache {reader.path.name}: {len(text.classes)} class text embeddings for {task.num_outputs} classes; "
                         f"rerun `extract zeroshot --cache {reader.path}`")
    width = reader.dataset("train" if "train" in reader.splits else reader.splits[0], source.feature).shape[1:]
    if tuple(width) != text.classes.shape[1:]:
        raise MedfmError(f"cache {reader.path.name}: text embeddings of width {text.classes.shape[1]} but pooled features of {tuple(width)}")
    return text.classes


@torch.no_grad()
def zeroshot_logits(features: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """`LOGIT_SCALE * normalise(features) @ classes.T` in float64, as float32 [N, C]."""
    x = F.normalize(torch.from_numpy(np.ascontiguousarray(features)).double(), dim=1)
    return (LOGIT_SCALE * x @ torch.from_numpy(classes).double().T).float().numpy()


def fit_zeroshot(config: TrainConfig, source: FeatureSource, task: Task, device: torch.device, progress: Progress | None = None) -> FitResult:
    """Score validation and test with the text embeddings as the classifier; a `FitResult` as a trained head's."""
    start = time.perf_counter()
    classes = class_text(source, task)
    predictions = {}
    for split in ("val", "test"):
        xs, ys = [], []
        for batch in source.eval_batches(split):
            xs.append(np.asarray(batch.features, dtype=np.float32).reshape(len(batch.features), -1))
            ys.append(batch.labels)
        predictions[split] = (np.concatenate(ys), zeroshot_logits(np.concatenate(xs), classes))
    val_y, val_logits = predictions["val"]
    test_y, test_logits = predictions["test"]
    text = source.reader.text_classes()
    state = {"classes": torch.from_numpy(classes), "logit_scale": torch.tensor(LOGIT_SCALE)}
    result = FitResult(config, 0, primary_score(task, val_y, val_logits), compute_metrics(task, val_y, val_logits),
                       compute_metrics(task, test_y, test_logits), [], state, time.perf_counter() - start, "", predictions)
    result.extra = {"logit_scale": LOGIT_SCALE, "templates": list(text.templates), "class_words": list(text.words),
                    "text_sha256": text.sha256}
    return result


register_head(HeadSpec(
    name="zeroshot", reads="pooled", build=fit_only("zeroshot"), fit=fit_zeroshot,
    description="CLIP zero-shot: 100 x cosine of the pooled image embedding with the class prompts' text embeddings "
                "(`extract zeroshot`); scenario zero-shot, no training (not in the study)",
))
