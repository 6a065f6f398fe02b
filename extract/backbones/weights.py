"""Finding and loading weights files: one loader for every family, and it never runs pickled code."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from common.checkpoints import WEIGHTS_DIR_ENV, find_weights, load_state_dict, unwrap_state_dict
from common.errors import MedfmError
from extract.backbones.base import BackboneSpec

__all__ = ["load_state_dict", "unwrap_state_dict"]  # re-exported: every family loads through these


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a backbone was built with; `identity` enters the cache fingerprint."""

    kind: str  # "pretrained" | "file" | "random"
    path: Path | None
    sha256: str | None
    architecture: str | None = None  # sha256 of the model's config where the name alone does not fix it (hf: folders)
    seed: int = 0  # random weights: which draw (`--weights random:SEED`); seeds 1.. are the report's null backbones

    @property
    def random(self) -> bool:
        return self.kind == "random"

    @property
    def identity(self) -> dict[str, str | None]:
        identity = {"kind": self.kind, "file": self.path.name if self.path else None, "sha256": self.sha256}
        identity |= {"seed": self.seed} if self.seed else {}  # seed 0 unsaid: the fingerprints of earlier caches keep
        return identity | ({"architecture": self.architecture} if self.architecture else {})


def sha256_file(path: Path) -> str:
    """sha256 of a file (or of every file in a folder, for HF-format model folders)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def find_default_weights(spec: BackboneSpec) -> Path | None:
    """The official file in MEDFM_WEIGHTS_DIR, else in the HF hub cache (timm / open_clip / HF); no download.

    A spec may bring its own search (`extra["find_weights"]`, e.g. an `hf:` model's folder)."""
    finder = spec.extra.get("find_weights")
    return finder() if finder is not None else find_weights(spec.weights_file, spec.hub_files)


def missing_weights_message(spec: BackboneSpec) -> str:
    if "missing_weights" in spec.extra:
        return spec.extra["missing_weights"]
    where = os.environ.get(WEIGHTS_DIR_ENV) or "a folder of your choice and set MEDFM_WEIGHTS_DIR to it"
    return (
        f"official weights for '{spec.name}' not found: download {spec.weights_file} from {spec.weights_url} "
        f"into {where}, or pass --weights PATH (or --weights random for an untrained baseline)"
    )


def resolve_weights(spec: BackboneSpec, weights: str, warn: Callable[[str], object] | None = None) -> ResolvedWeights:
    """`default` | `random[:SEED]` | `auto` | PATH -> the file to load (and its sha256), or a clear error.

    `auto` means the official weights when present, else random weights, announced loudly through `warn`.
    A spec whose name does not fix its architecture (`extra["architecture"]`) adds it to the identity.
    """
    resolved = _resolve_weights(spec, weights, warn)
    architecture = spec.extra.get("architecture")
    return replace(resolved, architecture=architecture) if architecture else resolved


def _resolve_weights(spec: BackboneSpec, weights: str, warn: Callable[[str], object] | None = None) -> ResolvedWeights:
    if weights == "auto":
        if find_default_weights(spec) is not None:
            return resolve_weights(spec, "default")
        if warn is None:
            from rich.console import Console

            warn = Console(stderr=True).print
        warn(f"[bold red]WARNING: RANDOM WEIGHTS for {spec.name}[/]: {missing_weights_message(spec)}. "
                        "Scores from these features say nothing about the pretrained model.")
        return ResolvedWeights("random", None, None)
    if weights == "random" or weights.startswith("random:"):
        return ResolvedWeights("random", None, None, seed=random_seed(weights))
    if weights == "default":
        path = find_default_weights(spec)
        if path is None:
            raise MedfmError(missing_weights_message(spec))
        return ResolvedWeights("pretrained", path, sha256_file(path))
    path = Path(weights).expanduser()
    if not path.exists():
        raise MedfmError(f"weights file {path} does not exist; pass default, random or an existing path")
    return ResolvedWeights("file", path, sha256_file(path))


def random_seed(weights: str) -> int:
    """`random` -> 0, `random:3` -> 3: which draw of random weights (a null backbone of the same architecture)."""
    text = weights.partition(":")[2] or "0"
    if not text.isascii() or not text.isdigit():
        raise MedfmError(f"--weights random:SEED takes a whole number of 0 or more, got '{weights}'")
    return int(text)


def take_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-dict under `prefix` with the prefix stripped (e.g. `backbone.` of a SEEM checkpoint)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def mismatch_error(err: RuntimeError, path: Path | None, model: str) -> MedfmError:
    """A state-dict mismatch as one line: which keys are missing or unexpected, and what to pass instead."""
    detail = " ".join(str(err).split())
    detail = detail if len(detail) <= 400 else detail[:400] + " ..."
    where = f"weights file {path}" if path else "the weights"
    return MedfmError(f"{where} do not fit {model} ({detail}); pass the official file for this backbone")


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path | None, model: str) -> None:
    """load_state_dict(strict=True): every tensor of the model comes from the file, or a clear error."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise mismatch_error(err, path, model) from None
