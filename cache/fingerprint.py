"""What makes two caches the same: a hash over everything that changes the stored features."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal settings give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the extraction settings.

    `settings` must hold every input that changes the features: backbone name, weights sha256,
    build overrides, transform spec, dataset name and manifest hash, layers, dtypes, precision.
    """
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()


def manifest_hash(manifest: dict[str, list[str]]) -> str:
    """sha256 of a split manifest (ids per split, in order)."""
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()
