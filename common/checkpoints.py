"""Finding and reading weights files without running pickled code, for every stage that loads weights
(extract's backbones, probe's DeiT head, a probe run's saved head)."""

from __future__ import annotations

import os
import pickle
import warnings
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


def load_state_dict(path: Path, fix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, from safetensors or a weights-only torch.load; pickled code is refused.

    Every way a file can fail to load (pickled code, an empty or truncated file, bytes that are no
    checkpoint at all, a damaged safetensors header) is a one-line `MedfmError`; torch's own warnings
    about the pickle protocol are silenced, since the refusal says what matters. `fix` replaces the advice
    of a file that is not what it should be (a weights file is downloaded again; a run's own file is not).
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise MedfmError(f"cannot read weights file {path} as safetensors ({_first_line(err)}); "
                             f"{fix or 'pass an intact .safetensors file (download it again)'}") from None
    return unwrap_state_dict(load_torch_file(path, fix), path, fix)


def load_torch_file(path: Path, fix: str | None = None) -> object:
    """What a torch file holds (tensors, numbers, strings and containers of them), from a weights-only torch.load: the
    file of `load_state_dict`, or a training checkpoint with its optimizer state. Pickled code, bytes that are no torch
    file and an empty or truncated file are each one `MedfmError` line naming the file; `fix` as in `load_state_dict`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 in the checkpoint": the error below says it better
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MedfmError(
            f"refusing to load {path}: torch's safe loader cannot read it ({_unpickler_reason(err)}); it is not a plain "
            "checkpoint of tensors (it may hold pickled code, or not be a checkpoint at all); "
            f"{fix or 'convert it to a plain state dict or safetensors from a trusted environment'}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = _first_line(err) or ("the file is empty" if path.is_file() and path.stat().st_size == 0 else type(err).__name__)
        raise MedfmError(f"cannot read weights file {path}: {reason}; {fix or 'pass an intact checkpoint (download it again)'}") from None
    except Exception as err:  # noqa: BLE001 - bytes that are no torch file trip the unpickler in any way (IndexError, KeyError, ...)
        raise MedfmError(f"cannot read weights file {path}: it is not a torch checkpoint ({type(err).__name__} in its pickle); "
                         f"{fix or 'pass an intact checkpoint (download it again)'}") from None
    return obj


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else ""


def _unpickler_reason(err: BaseException) -> str:
    """The line of torch's weights-only error that names the problem (e.g. `unsupported GLOBAL posix.system`),
    without its boilerplate paragraphs."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in str(err).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate):
            return line.rstrip(".")
    return "unsupported object"


def unwrap_state_dict(obj: object, path: Path, fix: str | None = None) -> dict[str, torch.Tensor]:
    """Tolerate {'model': ...} / {'state_dict': ...} wrappers and a `module.` prefix (DDP checkpoints)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise MedfmError(f"{path} holds no state dict of tensors; {fix or 'pass the official weights file'}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def load_into(module: torch.nn.Module, path: Path, what: str, fix: str) -> None:
    """The tensors of `path` into `module`, every one in its place: a file of some other model's tensors is one line
    naming the file and how they differ, never load_state_dict's RuntimeError. `what` names the module, `fix` what to do."""
    state = load_state_dict(path, fix)
    own = module.state_dict()
    differences = _differences(own, state)
    if differences:
        raise MedfmError(f"{path} holds the tensors of another model than {what} ({differences}); {fix}")
    module.load_state_dict(state)


def _differences(own: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """How a file's tensors differ from a module's, in a few words: the names it lacks, the names it adds, other shapes."""
    parts = []
    for said, names in (("it lacks", sorted(own.keys() - found.keys())), ("it has", sorted(found.keys() - own.keys()))):
        if names:
            parts.append(f"{said} {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    for name in sorted(own.keys() & found.keys()):
        if own[name].shape != found[name].shape:
            parts.append(f"{name} is {tuple(found[name].shape)} in the file, {tuple(own[name].shape)} in the model")
            break
    return "; ".join(parts)
