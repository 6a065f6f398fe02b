"""Benchmark 7: bootstrap intervals of a CheXpert-sized test set, 1,000 resamples of 200,000 rows, 14 labels (mean ROC-AUC).

What `probe report --ci 95` does per cell (`scoring.bootstrap.resample_metric`): resamples drawn as counts in blocks,
each label's AUC a count-weighted Mann-Whitney statistic. Timed once in this process with tracemalloc on (its peak,
above what was allocated before the call, is the peak extra memory: the prepared scorer plus one block), then once
over every core with joblib (`--jobs`), whose resamples must be the very same.

The predictions are synthetic, CheXpert-shaped: 14 labels of 2-40 % prevalence, 10 % of the entries unknown (NaN, as
the `ignore` policy leaves them), float32 logits that carry the label plus noise, rounded as a head's outputs tie.
`--smoke`: 20,000 rows, 3 labels, 200 resamples (still two blocks, so `--jobs` still runs them in worker processes).
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from bench.common import at_most, record, run_bench
from common.runtime import cpu_cores
from scoring import bootstrap
from scoring.bootstrap import interval, resample_metric


@dataclass(frozen=True)
class Sizes:
    rows: int
    labels: int
    resamples: int


FULL = Sizes(200_000, 14, 1000)
SMOKE = Sizes(20_000, 3, 200)


def predictions(rows: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    prevalence = np.linspace(0.02, 0.40, n_labels)
    labels = (rng.random((rows, n_labels)) < prevalence).astype(np.float32)
    logits = np.round(1.2 * labels + rng.normal(size=(rows, n_labels)), 3).astype(np.float32)
    labels[rng.random((rows, n_labels)) < 0.10] = np.nan
    return labels, logits


def main(smoke: bool = False) -> dict:
    s = SMOKE if smoke else FULL
    rows, n_labels, resamples = s.rows, s.labels, s.resamples
    labels, logits = predictions(rows, n_labels)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    one = resample_metric("mean_roc_auc", labels, [logits], boot=resamples, seed=0)
    seconds_one = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    jobs = cpu_cores()
    start = time.perf_counter()
    many = resample_metric("mean_roc_auc", labels, [logits], boot=resamples, seed=0, jobs=jobs)
    seconds_many = time.perf_counter() - start
    block = bootstrap.block_size(rows, resamples)
    scorer = 12 * rows * n_labels  # int32 rows by score, and each positive's two places among the negatives
    bound = bootstrap.BYTES_PER_CELL * bootstrap.BLOCK_ELEMENTS + scorer + 8 * resamples
    full = resamples * rows * 4  # every resample's int32 counts at once, what the blocks avoid
    found = interval(one, 95)
    print(f"bootstrap: {resamples} resamples x {rows} rows x {n_labels} labels: {seconds_one:.1f} s in 1 process, "
          f"{seconds_many:.1f} s in {jobs}; peak extra memory {peak / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB; "
          f"all counts at once would be {full / 2**20:.0f} MiB); 95% interval [{found.low:.4f}, {found.high:.4f}]", flush=True)
    ratios = {f"seconds_{resamples}x{rows // 1000}k_{n_labels}_labels_1_process": seconds_one, f"seconds_same_{jobs}_processes": seconds_many,
              "peak_extra_mib": peak / 2**20, "peak_extra_over_bound": peak / bound}
    details = {"rows": rows, "labels": n_labels, "resamples": resamples, "block": block, "jobs": jobs, "bound_mib": round(bound / 2**20, 1),
               "all_counts_mib": round(full / 2**20, 1), "interval": [round(found.low, 5), round(found.high, 5)],
               "same_resamples_across_jobs": bool(np.array_equal(one, many))}
    return record("bootstrap", ratios, {"peak_extra_over_bound": at_most(1.0)}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
