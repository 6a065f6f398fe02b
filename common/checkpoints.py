"""Finding and reading weights files without running pickled code, for every stage that loads weights
(extract's backbones, probe's DeiT head)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from common.errors import MedfmError

WEIGHTS_DIR_ENV = "MEDFM_WEIGHTS_DIR"


def find_weights(filename: str, hub_files: Iterable[tuple[str, str]] = ()) -> Path | None:
    """`filename` in MEDFM_WEIGHTS_DIR, else the first (repo_id, file) in the HF hub cache; never downloads."""
    weights_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if weights_dir and (Path(weights_dir) / filename).is_file():
        return Path(weights_dir) / filename
    hub_files = list(hub_files)
    if hub_files:
        from huggingface_hub import try_to_load_from_cache

        for repo_id, name in hub_files:
            hit = try_to_load_from_cache(repo_id, name)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
    return None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, from safetensors or a weights-only torch.load; pickled code is refused."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported object"
        raise MedfmError(
            f"refusing to load {path}: it needs arbitrary pickled code to load ({first}); "
            "convert it to a plain state dict or safetensors from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise MedfmError(f"cannot read weights file {path}: {str(err).splitlines()[0]}") from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Tolerate {'model': ...} / {'state_dict': ...} wrappers and a `module.` prefix (DDP checkpoints)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise MedfmError(f"{path} holds no state dict of tensors; pass the official weights file")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors
