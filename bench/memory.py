"""Benchmark 6: extraction's peak memory does not grow with the number of images.

Two fresh processes, started side by side, run `extract.runner.extract` on N and on 4N demo images; each reports
its own peak resident set. The features are made bulky on purpose (ViT-B-wide tokens in float32, 600 KB an image)
so that keeping them around would show: holding all 4N images' tokens would add about 110 MB over N's.
(Loader workers, when the device has any, hold a bounded prefetch; the CPU default runs none.)
`--smoke`: 8 and 32 images through a one-block ViT at 32 px.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import REPO, SMOKE_IMAGE_SIZE, SMOKE_VIT, at_most, record, run_bench

N = 64
BACKBONE, OVERRIDES = "deit", {"embed_dim": 768, "depth": 1, "num_heads": 12}
IMAGE_SIZE = 224
TARGET = 1.10
SMOKE_N = 8


def model(smoke: bool) -> tuple[int, dict]:
    """Input size and constructor overrides of the extracted model: bulky, or tiny for `--smoke`."""
    return (SMOKE_IMAGE_SIZE, SMOKE_VIT) if smoke else (IMAGE_SIZE, OVERRIDES)


def child(images: int, out: str, smoke: bool = False) -> None:
    """Run one extraction and print this process's peak RSS (MiB) as JSON."""
    from rich.console import Console

    from extract.runner import ExtractConfig, extract

    image_size, overrides = model(smoke)
    cfg = ExtractConfig(backbone=BACKBONE, dataset="demo", weights="random", out=Path(out), image_size=image_size,
                        device="cpu", token_dtype="float32", dataset_options={"per_class": images // 4}, overrides=overrides)
    result = extract(cfg, Console(quiet=True))
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({
        "images": sum(result.rows.values()),
        "main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "cache_mib": result.path.stat().st_size / 2**20,
    }))


def measure(images: int, work: Path, smoke: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    code = f"from bench.memory import child; child({images}, {str(out)!r}, smoke={smoke})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"extraction of {images} images failed:\n{done.stderr[-2000:]}")
    shutil.rmtree(out)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(smoke: bool = False) -> dict:
    n = SMOKE_N if smoke else N
    work = Path(tempfile.mkdtemp(prefix="medfm-bench-memory-"))
    try:
        with ThreadPoolExecutor(2) as pool:  # the two processes side by side: each one's own peak is what is measured
            small, large = pool.map(lambda images: measure(images, work, smoke), (n, 4 * n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {"peak_rss_4n_over_n": large["main_mib"] / small["main_mib"]}
    image_size, overrides = model(smoke)
    details = {"model": f"{BACKBONE} {overrides}", "image_size": image_size, "tokens": "float32",
               "n": {k: round(v, 1) for k, v in small.items()}, "4n": {k: round(v, 1) for k, v in large.items()}}
    return record("memory", ratios, {k: at_most(TARGET) for k in ratios}, details, smoke)


if __name__ == "__main__":
    run_bench(main)
