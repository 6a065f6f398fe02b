"""Where caches live and how they are found: one naming rule for the writer (`extract`) and every reader.

A cache of (backbone, dataset) is `<features>/<backbone>/<dataset>-<fingerprint[:12]>.h5` (`cache_path`; a backbone named
with a `/`, such as `hf:facebook/dinov2-base`, gets the flat folder `hf:facebook_dinov2-base`);
`find_cache` finds the one complete file of a (backbone, dataset) pair, or says in one line why it cannot.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cache.store import PARTIAL_SUFFIX, CacheReader, describe
from common.errors import MedfmError
from common.runtime import output_root


def find_cache(backbone: str | None, dataset: str | None, cache: Path | None = None, features: Path | None = None,
               backbone_seed: int = 0) -> Path:
    """The one complete cache of (backbone, dataset) under the features folder, or `cache` when given.

    Caches of null backbones (`extract run --weights random:SEED`, SEED >= 1) are found only when `backbone_seed` names
    their draw, so they never make the search for the backbone's own cache ambiguous."""
    if cache is not None:
        return Path(cache)
    if not backbone or not dataset:
        raise MedfmError("pass --backbone and --dataset (or --cache FILE)")
    folder = (features or output_root() / "features") / backbone_folder(backbone)
    name = re.compile(rf"^{re.escape(dataset)}-[0-9a-f]{{12}}\.h5$")
    complete = sorted(p for p in folder.glob(f"{dataset}-*.h5") if name.match(p.name) and weights_seed(p) == backbone_seed)
    partial = sorted(p for p in folder.glob(f"{dataset}-*.h5{PARTIAL_SUFFIX}") if name.match(p.name[: -len(PARTIAL_SUFFIX)]))
    if len(complete) > 1:
        raise MedfmError(f"several caches for backbone {backbone} and dataset {dataset}, extracted with different settings: "
                         f"{settings_differences(complete)}; choose one with --cache FILE")
    if complete:
        return complete[0]
    if partial:
        raise MedfmError(f"the cache {partial[0]} for backbone {backbone} and dataset {dataset} is incomplete; "
                         f"rerun `extract run --backbone {backbone} --dataset {dataset}` with the same settings to finish it")
    weights = f" --weights random:{backbone_seed}" if backbone_seed else ""
    raise MedfmError(f"no cache for backbone {backbone}{f' (random draw {backbone_seed})' if backbone_seed else ''} and dataset "
                     f"{dataset} under {folder}; run `extract run --backbone {backbone} --dataset {dataset}{weights}` first "
                     "(or pass --cache FILE)")


def weights_seed(path: Path) -> int:
    """Which draw of random weights a cache's features came from (0: the backbone's own weights, or the seed-0 draw)."""
    try:
        return int(describe(path)["meta"].get("backbone", {}).get("weights", {}).get("seed", 0))
    except (OSError, ValueError, TypeError):
        return 0  # an unreadable file is the reader's to report, with its own message


def settings_differences(paths: list[Path]) -> str:
    """Each cache with the extraction settings that set it apart, e.g. `a.h5 (norm.kind=study)`."""
    flat = [flatten_settings(describe(path)["meta"].get("settings", {})) for path in paths]
    differing = sorted({k for f in flat for k in f if any(g.get(k) != f.get(k) for g in flat)})
    return "; ".join(f"{path}" + (f" ({', '.join(f'{k}={_short(f.get(k))}' for k in differing)})" if differing else "")
                     for path, f in zip(paths, flat, strict=True))


def flatten_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """{"norm": {"kind": "study"}} -> {"norm.kind": "study"}: one level, as extraction settings nest."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _short(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_cache(path: Path, backbone: str | None, dataset: str | None) -> CacheReader:
    """Open a cache and check it holds the backbone and dataset asked for, and what a probe needs to know."""
    reader = CacheReader(path)
    try:
        meta = reader.meta  # the typed contract: a cache without it is a clear error here
        for flag, asked, held in (("--backbone", backbone, meta.backbone.name), ("--dataset", dataset, meta.dataset.name)):
            if asked and asked != held:
                raise MedfmError(f"{path} holds {flag[2:]} '{held}', not '{asked}'; drop {flag} or pass the right --cache")
    except MedfmError:
        reader.close()
        raise
    return reader


def backbone_folder(backbone: str) -> str:
    """The folder a backbone's caches go in: its name, with what a file system would take as a path (the `/` of
    `hf:facebook/dinov2-base` or of a model folder's path) made safe, so every backbone gets one flat folder."""
    return re.sub(r"[^\w.@:+=-]", "_", backbone.strip("/"))


def cache_path(out: Path, backbone: str, dataset: str, fp: str) -> Path:
    return Path(out) / backbone_folder(backbone) / f"{dataset}-{fp[:12]}.h5"
