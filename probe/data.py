"""Cache -> batches: find the cache, then serve its features in RAM when they fit the budget, else streamed from HDF5.

Training draws a uniform shuffle of the valid train rows each epoch (a permutation seeded by (data seed, epoch)) and
serves full batches in permutation order, as the study's DataLoader(shuffle=True, drop_last=True) does: a batch's
rows are a random sample of the split, whatever the order rows were stored in (often by class or patient).
RAM mode indexes the permutation directly. Streamed mode walks the same permutation a window at a time (a whole
number of batches, as many rows as the RAM budget holds): it reads the window's rows in file order, gathered chunk by
chunk off the file's raw chunks (`cache.store.CacheReader.take_rows`), and serves them in permutation order, so both
modes give the same batches and a run's result does not depend on whether its features fitted in memory. Streamed
mode holds one window and two batches.

Tokens stored as int8 (`extract run --token-dtype int8`) stay int8 in RAM and in a streamed window, beside their
per-token scales, and are dequantized to float32 batch by batch (`cache.store.dequantize`): a token cache takes half
of float16's memory, so more of them fit the RAM budget, and a head sees float32 as with any other cache.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psutil

from cache.schema import view_group
from cache.store import CacheReader, dequantize
from common.errors import MedfmError

if TYPE_CHECKING:
    from probe.folds import FoldRows

RAM_FRACTION = 0.5  # default budget: half of the memory available when the run starts
EVAL_BATCH = 256
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`2G`, `500M`, `1.5GiB`, `1048576` -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise MedfmError(f"--max-ram must be a size such as 2G, 500M or 1048576; got '{text}'")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def check_trainable(reader: CacheReader) -> None:
    """A cache to train on has a train split; a corrupted test view (`extract run --corrupt`) holds the test split alone."""
    if "train" not in reader.splits:
        raise MedfmError(f"cache {reader.path} has no train split to train on (it holds {', '.join(reader.splits)}); train on its "
                         "clean cache (--cache without the +<kind>-<severity> part), then score this one with "
                         f"`probe eval RUN --cache {reader.path}`")


def feature_name(reader: CacheReader, kind: str, layer: int | None) -> str:
    """The cache array of feature `kind` (pooled or tokens, what a head reads) at block `layer` (None: the last;
    negative: from the end, so -4 of a 12-block backbone is block 8, `pooled@8`)."""
    check_trainable(reader)
    name = reader.meta.feature(kind, layer)
    if name not in reader.feature_names():
        held = ", ".join(reader.feature_names())
        hint = "re-extract with --tokens" if kind == "tokens" else "re-extract with --layers including it"
        raise MedfmError(f"cache {reader.path} has no '{name}' features (it holds {held}); {hint}")
    return name


def default_budget() -> int:
    return int(psutil.virtual_memory().available * RAM_FRACTION)


@dataclass(frozen=True)
class Batch:
    features: np.ndarray  # [B, D] or [B, T, D], the stored dtype (float32 for int8 arrays, dequantized)
    labels: np.ndarray  # [B] int64 or [B, C] float32


class FeatureSource:
    """One feature array of a cache (e.g. `pooled`, `tokens@4`) with its labels, split by split.

    `passes[split]` counts the passes over that split's features (a sweep proves it reads them once per epoch).
    With `views` K > 0 the train batches of epoch e (1-based) come from the cache's augmented train view
    (e - 1) mod K instead of the eval view: the study's augmented frozen protocol, one view per epoch.
    With `rows` (file row indices of the train split, e.g. a label-efficiency subset) only those train rows are
    served, in training, in `eval_batches("train")` and in `labels("train")`; rows skipped at extraction stay out
    (the filter composes with `valid`). Validation and test are never filtered.
    With `fold` (`probe.folds.fold_rows`) the train and test splits are a cross-validation fold's rows, drawn from the
    cache's train and test splits alike; a fold is held in RAM and trains on the eval view.
    """

    def __init__(self, reader: CacheReader, feature: str, batch_size: int, max_ram: int | None = None, views: int = 0,
                 rows: np.ndarray | None = None, fold: FoldRows | None = None) -> None:
        if batch_size < 1:
            raise MedfmError(f"--batch-size must be at least 1, got {batch_size}")
        if views > reader.meta.views:
            raise MedfmError(f"--views {views}: the cache {reader.path.name} holds {reader.meta.views} augmented train views; "
                             "extract it with --views K --augment study, or train on --views 0 (the eval view)")
        self.reader, self.feature, self.batch_size = reader, feature, batch_size
        self.train_groups = [view_group(v) for v in range(views)] or ["train"]
        self.splits = [*reader.splits, *(g for g in self.train_groups if g != "train")]  # the eval view too: for --standardize
        for split in self.splits:
            reader.dataset(split, feature)  # a clear error when the cache lacks this feature
        self.scales = reader.scales(self.splits[0], feature)  # int8 features: their scales' array, else None
        arrays = [feature] if self.scales is None else [feature, self.scales]
        self.budget = default_budget() if max_ram is None else int(max_ram)
        self.nbytes = sum(reader.nbytes(s, a) for s in self.splits for a in arrays)
        self.streamed = self.nbytes > self.budget
        self.passes: Counter[str] = Counter()
        self._valid = {s: reader.valid(s) for s in reader.splits}
        self._labels = {s: self._raw_labels(s) for s in reader.splits}  # before the rows filter: labels sit at valid rows
        if rows is not None:
            self._valid["train"] = self._valid["train"] & _row_mask(rows, len(self._valid["train"]))
            if not self._valid["train"].any():
                raise MedfmError(f"the train subset selects none of the {len(self._valid['train'])} train rows of {reader.path.name}")
        # the split that sets the row layout: train, or the one split of a cache without it (a corrupted test view)
        self.layout_split = "train" if "train" in reader.splits else reader.splits[0]
        train = reader.dataset(self.layout_split, feature)
        self.chunk_rows = train.chunks[0] if train.chunks else max(len(train), 1)
        values = int(np.prod(train.shape[1:], dtype=np.int64))
        self.row_bytes = values * train.dtype.itemsize  # as stored, with its scales
        if self.scales is not None:
            self.row_bytes += 4 * int(np.prod(reader.dataset(self.layout_split, self.scales).shape[1:], dtype=np.int64))
        self.batch_row_bytes = values * 4 if self.scales is not None else self.row_bytes  # as served: int8 dequantized
        self.window_rows = self._window_rows()
        self._ram: dict[str, np.ndarray] = {}
        self._ram_scales: dict[str, np.ndarray] = {}
        if self.streamed:
            self._check_window_fits()
        else:
            self._ram = {s: reader.dataset(s, feature)[:] for s in self.splits}
            if self.scales is not None:
                self._ram_scales = {s: reader.dataset(s, self.scales)[:] for s in self.splits}
        self._ids = {s: reader.ids(s) for s in reader.splits}
        if fold is not None:
            self._use_fold(fold, views, rows)

    def ids(self, split: str) -> np.ndarray:
        """Sample ids of the valid rows, in the order of `labels` and `eval_batches`."""
        return self._ids[split]

    def _use_fold(self, fold: FoldRows, views: int, rows: np.ndarray | None) -> None:
        """Serve the fold's rows as the train and test splits (each gathered from the cache's train and test rows)."""
        if self.streamed:
            raise MedfmError(f"--folds holds the features in RAM, and {self.nbytes / 2**20:.0f} MiB of {self.feature} exceed "
                             f"the budget of {self.budget / 2**20:.0f} MiB; raise --max-ram")
        if views or rows is not None:
            raise MedfmError("--folds trains on the eval view and every train row of its fold: give --views 0, no subset")
        ram, scales, labels = dict(self._ram), dict(self._ram_scales), dict(self._labels)
        for split, parts in (("train", fold.train), ("test", fold.test)):
            self._ram[split] = np.concatenate([ram[s][r] for s, r in parts.items()])
            if scales:
                self._ram_scales[split] = np.concatenate([scales[s][r] for s, r in parts.items()])
            self._labels[split] = np.concatenate([labels[s][r] for s, r in parts.items()])
            self._valid[split] = np.ones(len(self._labels[split]), dtype=bool)
            self._ids[split] = fold.ids[split]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.reader.dataset(self.layout_split, self.feature).shape[1:])

    @property
    def mode(self) -> str:
        return "streamed" if self.streamed else "ram"

    @property
    def window_chunks(self) -> int:
        """A streamed window's size in chunks (rounded up): the memory it holds, counted as bench/reads.py counts it."""
        return max(1, math.ceil(self.window_rows / self.chunk_rows))

    def labels(self, split: str) -> np.ndarray:
        """Labels of the valid rows, in file order (the order of `eval_batches`)."""
        return self._labels[split][self._valid[split]]

    def train_batches(self, epoch_seed: tuple[int, ...]) -> Iterator[Batch]:
        """Full batches of the train split in a uniform shuffle; the last partial batch is dropped, as in the study,
        unless the split is smaller than one batch (then it is the one batch).

        `epoch_seed` is (data seed, epoch): it seeds the permutation and, with augmented views, picks the view.
        """
        self.passes["train"] += 1
        group = self.train_groups[(epoch_seed[-1] - 1) % len(self.train_groups)]
        labels, size = self._labels["train"], self.batch_size
        order = self.epoch_order(epoch_seed)
        if not self.streamed:
            for b in range(0, len(order), size):
                yield Batch(self._ram_rows(group, order[b : b + size]), labels[order[b : b + size]])
            return
        for w in range(0, len(order), self.window_rows):
            window = order[w : w + self.window_rows]
            rows = np.sort(window)
            block = self.reader.take_rows(group, self.feature, rows)
            scales = None if self.scales is None else self.reader.take_rows(group, self.scales, rows)
            position = np.searchsorted(rows, window)
            for b in range(0, len(window), size):
                yield Batch(self._served(block, scales, position[b : b + size]), labels[window[b : b + size]])
            del block, scales  # before the next window is read: one window at a time

    def epoch_order(self, epoch_seed: tuple[int, ...]) -> np.ndarray:
        """The file rows an epoch serves, in serving order: a permutation of the valid train rows seeded by `epoch_seed`,
        cut to whole batches (all of it when the split is smaller than one batch)."""
        order = np.random.default_rng(list(epoch_seed)).permutation(np.flatnonzero(self._valid["train"]))
        return order[: len(order) // self.batch_size * self.batch_size or len(order)]

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """All valid rows of `split` in file order, read chunk by chunk when streamed."""
        self.passes[split] += 1
        valid, labels = self._valid[split], self._labels[split]
        if not self.streamed:
            rows = np.flatnonzero(valid)
            for b in range(0, len(rows), EVAL_BATCH):
                yield Batch(self._ram_rows(split, rows[b : b + EVAL_BATCH]), labels[rows[b : b + EVAL_BATCH]])
            return
        for start, block in self.reader.iter_slices(split, self.feature):
            keep = valid[start : start + len(block)]
            scales = None if self.scales is None else self.reader.read_rows(split, self.scales, start, start + len(block))
            for b in range(0, len(block), EVAL_BATCH):
                part = np.flatnonzero(keep[b : b + EVAL_BATCH]) + b
                if len(part):
                    yield Batch(self._served(block, scales, part), labels[start + part])

    def _ram_rows(self, group: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a group held in RAM, as a batch serves them."""
        return self._served(self._ram[group], self._ram_scales.get(group), rows)

    def _served(self, block: np.ndarray, scales: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        """`block[rows]`, dequantized (float32) when the feature is int8 (`scales` its scales)."""
        return block[rows] if scales is None else dequantize(block[rows], scales[rows])

    def steps_per_epoch(self) -> int:
        rows = int(self._valid["train"].sum())
        return rows // self.batch_size or min(rows, 1)

    def _raw_labels(self, split: str) -> np.ndarray:
        """Labels indexed by file row (rows skipped at extraction keep a zero placeholder, never read)."""
        valid, labels = self._valid[split], self.reader.labels(split)
        raw = np.zeros((len(valid), *labels.shape[1:]), dtype=labels.dtype)
        raw[valid] = labels
        return raw

    def _window_rows(self) -> int:
        """Rows of a streamed window: as many whole batches as the budget holds beside two batches
        (the one served and the consumer's previous one), at least one batch, at most the epoch's rows."""
        size = self.batch_size
        room = (self.budget - 2 * size * self.batch_row_bytes) // max(self.row_bytes, 1)
        epoch = int(self._valid[self.layout_split].sum())
        return max(size, min(room // size, math.ceil(epoch / size)) * size)

    def _check_window_fits(self) -> None:
        """Streamed mode holds one window (at least one batch) and two batches; refuse a budget below that."""
        need = self.window_rows * self.row_bytes + 2 * self.batch_size * self.batch_row_bytes
        if need > self.budget:
            raise MedfmError(
                f"--max-ram {self.budget / 2**20:.0f} MiB is below what streaming needs ({need / 2**20:.0f} MiB: a shuffle window of "
                f"one batch of {self.batch_size} rows and two batches); "
                "raise --max-ram or lower --batch-size"
            )


def _row_mask(rows: np.ndarray, n: int) -> np.ndarray:
    """A boolean mask over `n` file rows that is True at `rows` (indices, any order, repeats ignored)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"train rows must lie in [0, {n}); got {rows.min()}..{rows.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask
