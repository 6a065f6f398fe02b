"""Predictions of a finished run for unlabelled images, as a table: one row per image, its predicted class and the
probability of every class (softmax; a multilabel task's labels each by its sigmoid, every label at 0.5 or more named).

The images go through the run's own eval transform (`extract.transforms.eval_transform` of its spec) and decoder
(extract's `ImageDataset`), so on the images of its test split a run gives back its stored test predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit, softmax

from cache.schema import Task
from common.errors import MedfmError
from common.runtime import loader_workers, resolve_device
from extract.datasets.images import ImageDataset
from extract.transforms import eval_transform
from ledger.runs import read_config
from ledger.store import Ledger
from predict.images import SPLIT, unlabelled
from predict.runs import RunModel, find_run, load_run_model

MULTILABEL_THRESHOLD = 0.5


def predict(run: str, images: Path, *, ledger: Ledger | None = None, device: str = "auto", weights: str | None = None,
            batch_size: int = 32) -> tuple[RunModel, pd.DataFrame]:
    """The run named `run` (ledger id or run folder) on the images of `images` (a folder or a CSV with a `path` column)."""
    if batch_size < 1:
        raise MedfmError(f"--batch-size must be at least 1, got {batch_size}")
    record = find_run(ledger or Ledger(), run)
    config = read_config(record)
    source = unlabelled(images, config.task_spec)
    dev = resolve_device(device)
    model = load_run_model(record, config, source, dev, weights)
    spec = model.transform
    data = ImageDataset(source, SPLIT, eval_transform(spec), (spec.channels, spec.size, spec.size))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=loader_workers(None, dev))
    logits = []
    for batch, ok, errors in loader:
        if not bool(ok.all()):
            raise MedfmError(f"cannot read image {errors[int(np.flatnonzero(~ok.numpy())[0])]}; fix or remove it")
        logits.append(model.logits(batch))
    split = source.splits[SPLIT]
    return model, table(model.task, split.ids, [str(p) for p in split.images], torch.cat(logits).numpy())


def table(task: Task, ids: list[str], paths: list[str], logits: np.ndarray) -> pd.DataFrame:
    """One row per image: id, path, prediction, then `p_<class>` for every class."""
    names = list(task.class_names)
    if task.kind == "multilabel":
        probs = expit(logits)
        chosen = ["|".join(n for n, p in zip(names, row, strict=True) if p >= MULTILABEL_THRESHOLD) for row in probs]
    else:
        probs = softmax(logits, axis=1)
        chosen = [names[i] for i in probs.argmax(1)]
    columns = {f"p_{name}": probs[:, k] for k, name in enumerate(names)}
    return pd.DataFrame({"id": ids, "path": paths, "prediction": chosen, **columns})
