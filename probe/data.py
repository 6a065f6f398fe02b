"""Cache -> batches: find the cache, then serve its features in RAM when they fit the budget, else streamed from HDF5 chunk by chunk.

Random row reads from HDF5 are ~100x slower than contiguous ones (docs/architecture.md, "The cache"), so the
training order is built from the file's chunks: chunks in a shuffled order, grouped into windows of
a few chunks, rows shuffled within each window. RAM mode follows the very same order, so a run's
result does not depend on whether its features fitted in memory. Streamed mode holds at most one
window plus one batch of features.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psutil

from cache.schema import view_group
from cache.store import CacheReader
from common.errors import MedfmError

RAM_FRACTION = 0.5  # default budget: half of the memory available when the run starts
EVAL_BATCH = 256
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`2G`, `500M`, `1.5GiB`, `1048576` -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise MedfmError(f"--max-ram must be a size such as 2G, 500M or 1048576; got '{text}'")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def feature_name(reader: CacheReader, kind: str, layer: int | None) -> str:
    """The cache array of feature `kind` (pooled or tokens, what a head reads) at block `layer` (None: the last;
    negative: from the end, so -4 of a 12-block backbone is block 8, `pooled@8`)."""
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
    features: np.ndarray  # [B, D] or [B, T, D], the stored dtype
    labels: np.ndarray  # [B] int64 or [B, C] float32


class FeatureSource:
    """One feature array of a cache (e.g. `pooled`, `tokens@4`) with its labels, split by split.

    `passes[split]` counts the passes over that split's features (a sweep proves it reads them once per epoch).
    With `views` K > 0 the train batches of epoch e (1-based) come from the cache's augmented train view
    (e - 1) mod K instead of the eval view: the study's augmented frozen protocol, one view per epoch.
    With `rows` (file row indices of the train split, e.g. a label-efficiency subset) only those train rows are
    served, in training, in `eval_batches("train")` and in `labels("train")`; rows skipped at extraction stay out
    (the filter composes with `valid`). Validation and test are never filtered.
    """

    def __init__(self, reader: CacheReader, feature: str, batch_size: int, max_ram: int | None = None, views: int = 0,
                 rows: np.ndarray | None = None) -> None:
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
        self.budget = default_budget() if max_ram is None else int(max_ram)
        self.nbytes = sum(reader.nbytes(s, feature) for s in self.splits)
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
        self.window_chunks = max(1, math.ceil(2 * batch_size / self.chunk_rows))
        self.row_bytes = train.dtype.itemsize * int(np.prod(train.shape[1:], dtype=np.int64))
        self._ram: dict[str, np.ndarray] = {}
        if self.streamed:
            self._check_window_fits()
        else:
            self._ram = {s: reader.dataset(s, feature)[:] for s in self.splits}

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.reader.dataset(self.layout_split, self.feature).shape[1:])

    @property
    def mode(self) -> str:
        return "streamed" if self.streamed else "ram"

    def labels(self, split: str) -> np.ndarray:
        """Labels of the valid rows, in file order (the order of `eval_batches`)."""
        return self._labels[split][self._valid[split]]

    def train_batches(self, epoch_seed: tuple[int, ...]) -> Iterator[Batch]:
        """Shuffled full batches of the train split; the last partial batch is dropped, as in the study,
        unless the split is smaller than one batch (then it is the one batch).

        `epoch_seed` is (data seed, epoch): it orders the batches and, with augmented views, picks the view.
        """
        self.passes["train"] += 1
        group = self.train_groups[(epoch_seed[-1] - 1) % len(self.train_groups)]
        labels, size = self._labels["train"], self.batch_size
        if not self.streamed:
            order = np.concatenate([order for _, order in self._epoch_plan(epoch_seed)])
            for b in range(0, len(order) // size * size or len(order), size):
                yield Batch(self._ram[group][order[b : b + size]], labels[order[b : b + size]])
            return
        carry, carry_rows = None, np.zeros(0, dtype=np.int64)
        for rows, order in self._epoch_plan(epoch_seed):
            block = _read_rows(self.reader, group, self.feature, rows)
            position = np.searchsorted(rows, order)
            at = 0
            if carry is not None:
                at = min(size - len(carry), len(order))
                carry = np.concatenate([carry, block[position[:at]]])
                carry_rows = np.concatenate([carry_rows, order[:at]])
                if len(carry) < size:
                    continue
                yield Batch(carry, labels[carry_rows])
            while at + size <= len(order):
                yield Batch(block[position[at : at + size]], labels[order[at : at + size]])
                at += size
            carry, carry_rows = block[position[at:]], order[at:]
        if carry is not None and 0 < len(carry) == int(self._valid["train"].sum()):
            yield Batch(carry, labels[carry_rows])  # a split smaller than one batch

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """All valid rows of `split` in file order, read chunk by chunk when streamed."""
        self.passes[split] += 1
        valid, labels = self._valid[split], self._labels[split]
        if not self.streamed:
            rows = np.flatnonzero(valid)
            for b in range(0, len(rows), EVAL_BATCH):
                yield Batch(self._ram[split][rows[b : b + EVAL_BATCH]], labels[rows[b : b + EVAL_BATCH]])
            return
        for start, block in self.reader.iter_slices(split, self.feature):
            keep = valid[start : start + len(block)]
            for b in range(0, len(block), EVAL_BATCH):
                part = keep[b : b + EVAL_BATCH]
                if part.any():
                    yield Batch(block[b : b + EVAL_BATCH][part], labels[start + b : start + b + EVAL_BATCH][part])

    def steps_per_epoch(self) -> int:
        rows = int(self._valid["train"].sum())
        return rows // self.batch_size or min(rows, 1)

    def _epoch_plan(self, epoch_seed: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per window of shuffled chunks: its valid rows in file order, and the same rows shuffled."""
        rng = np.random.default_rng(list(epoch_seed))
        n, step = len(self._valid["train"]), self.chunk_rows
        chunks = rng.permutation(math.ceil(n / step)).tolist()
        plan = []
        for i in range(0, len(chunks), self.window_chunks):
            window = sorted(chunks[i : i + self.window_chunks])
            rows = np.concatenate([np.arange(c * step, min((c + 1) * step, n)) for c in window])
            rows = rows[self._valid["train"][rows]]
            if len(rows):
                plan.append((rows, rng.permutation(rows)))
        return plan

    def _raw_labels(self, split: str) -> np.ndarray:
        """Labels indexed by file row (rows skipped at extraction keep a zero placeholder, never read)."""
        valid, labels = self._valid[split], self.reader.labels(split)
        raw = np.zeros((len(valid), *labels.shape[1:]), dtype=labels.dtype)
        raw[valid] = labels
        return raw

    def _check_window_fits(self) -> None:
        """Streamed mode holds one shuffle window plus up to four batches (carried rows, their extension, the batch
        served and the consumer's previous one); refuse a budget below that."""
        need = (self.window_chunks * self.chunk_rows + 4 * self.batch_size) * self.row_bytes
        if need > self.budget:
            raise MedfmError(
                f"--max-ram {self.budget / 2**20:.0f} MiB is below what streaming needs ({need / 2**20:.0f} MiB: a shuffle window of "
                f"{self.window_chunks} chunk(s) of {self.chunk_rows} rows plus a batch); raise --max-ram or lower --batch-size"
            )


def _row_mask(rows: np.ndarray, n: int) -> np.ndarray:
    """A boolean mask over `n` file rows that is True at `rows` (indices, any order, repeats ignored)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"train rows must lie in [0, {n}); got {rows.min()}..{rows.max()}")
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _read_rows(reader: CacheReader, group: str, feature: str, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted) of a train group's `feature` (the eval view or an augmented one), read as contiguous ranges
    straight into one array (by `CacheReader.read_rows`, which copies raw chunks off the mapped file at memmap speed)."""
    dataset = reader.dataset(group, feature)
    block = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    at = 0
    for part in np.split(rows, breaks):
        reader.read_rows(group, feature, int(part[0]), int(part[-1]) + 1, block[at : at + len(part)])
        at += len(part)
    return block
