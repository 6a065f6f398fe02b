"""`extract check-backbone`: a backbone named by its library, checked against that library's own forward.

medfm's pooled and token features (`extract/backbones/library.py`) are compared with the reference package's own
forward on one seeded random batch, with the same weights: timm's `create_model` reading the file with timm's own
loader, open_clip's `create_model` (its `load_checkpoint` for a full checkpoint) and `encode_image`, transformers'
`from_pretrained`. Then: the block taps against the library's own intermediates (`forward_intermediates`,
`hidden_states`), the model at 224 px, the one-channel stem (its features on a gray image equal the three-channel
model's on [gray, 0, 0]), the load report, and the time per image. The receipt (JSON, with the weights' sha256) goes beside the weights, or into
$MEDFM_OUTPUT/checks where that is not writable. Any failure raises one line naming the first problem.

The bound: max |medfm - reference| <= tolerance x (1 + max |reference|), tolerance 1e-4 by default (both sides run
the same operations in fp32; the slack is for kernels that sum in another order).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import MedfmError
from common.runtime import output_root, resolve_device
from extract.backbones.base import Backbone
from extract.backbones.by_name import (
    TINY_TEXT,
    hf_config,
    hf_from_pretrained,
    hf_image_side,
    hf_load_problems,
    hf_model,
    open_clip_vision_cfg,
)
from extract.backbones.library import MEDFM_OPTIONS, LibraryBackbone
from extract.backbones.registry import create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, load_state_dict, resolve_weights
from extract.names import parse_library_name

TOLERANCE = 1e-4
BATCH = 2
CHECKS = "checks"  # $MEDFM_OUTPUT/checks: receipts that cannot go beside their weights


@dataclass
class Comparison:
    """medfm against the reference on one array."""

    shape: list[int]
    reference_shape: list[int]
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    bound: float | None = None

    @property
    def passed(self) -> bool:
        return self.shape == self.reference_shape and self.max_abs_error is not None and self.max_abs_error <= (self.bound or 0.0)


@dataclass
class CheckReport:
    backbone: str
    weights: dict[str, Any]
    weights_path: str | None
    image_size: int | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    worked_out: str = ""
    reference: str = ""
    tolerance: float = TOLERANCE
    bound: str = "max |medfm - reference| <= tolerance x (1 + max |reference|)"
    pooled: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    at_224: dict[str, Any] = field(default_factory=dict)
    one_channel: dict[str, Any] = field(default_factory=dict)
    load: list[str] = field(default_factory=list)
    seconds_per_image: float | None = None
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    checked_at: str = ""
    receipt: str = ""


def compare(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> Comparison:
    result = Comparison(list(ours.shape), list(theirs.shape))
    if ours.shape == theirs.shape:
        diff = (ours.float() - theirs.float()).abs()
        result.max_abs_error, result.mean_abs_error = float(diff.max()), float(diff.mean())
        result.bound = tolerance * (1.0 + float(theirs.float().abs().max()))
    return result


def _said(what: str, c: Comparison) -> str | None:
    """One failure line for a comparison that failed, else None."""
    if c.shape != c.reference_shape:
        return f"{what}: medfm's shape {tuple(c.shape)} is not the reference's {tuple(c.reference_shape)}"
    if not c.passed:
        return f"{what} differ from the reference: max abs error {c.max_abs_error:.3g} > bound {c.bound:.3g}"
    return None


# --- the references ---------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The library's own model: `forward(x) -> (pooled, tokens)`; `blocks(x, indices) -> tokens per block`, where the
    library gives its blocks' normed patch tokens (None: it does not, or not by medfm's block numbering)."""

    how: str
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    blocks: Callable[[torch.Tensor, list[int]], list[torch.Tensor]] | None = None
    problems: list[str] = field(default_factory=list)
    module: nn.Module | None = None


def _timm_tokens(model: nn.Module, final: torch.Tensor) -> torch.Tensor:
    if final.ndim == 3:
        return final[:, getattr(model, "num_prefix_tokens", 0):]
    return final.flatten(1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else final.flatten(2).transpose(1, 2)


def timm_reference(name: str, model: LibraryBackbone, weights: ResolvedWeights) -> Reference:
    import timm

    full = name.partition(":")[2]
    kwargs = dict(model.library_kwargs)
    if weights.path is not None and timm.models.get_pretrained_cfg(full) is not None:
        ref = timm.create_model(full, pretrained=True, pretrained_cfg_overlay={"file": str(weights.path)}, num_classes=0, **kwargs)
        how = "timm.create_model(pretrained=True) reading the file with timm's own loader; pooled = model(x), tokens = forward_features"
    else:
        ref = timm.create_model(full, pretrained=False, num_classes=0, **kwargs)
        state = load_state_dict(weights.path) if weights.path is not None else {k.partition(".")[2]: v for k, v in model.state_dict().items()}
        ref.load_state_dict(state, strict=True)
        how = "timm.create_model with " + ("the file's tensors" if weights.path else "medfm's random weights") + \
            "; pooled = model(x), tokens = forward_features"
    ref.eval()

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ref(x), _timm_tokens(ref, ref.forward_features(x))

    blocks = None
    if hasattr(ref, "forward_intermediates") and len(getattr(ref, "blocks", ())) == model.num_layers and model.prefix_tokens == getattr(ref, "num_prefix_tokens", -1):
        def blocks(x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
            return list(ref.forward_intermediates(x, indices=indices, norm=True, output_fmt="NLC", intermediates_only=True))
    return Reference(how, forward, blocks, module=ref)


def open_clip_reference(name: str, model: LibraryBackbone, weights: ResolvedWeights) -> Reference:
    import open_clip

    parsed = parse_library_name(name)
    arch = parsed.model
    kwargs = dict(model.library_kwargs)
    size = model.data_config.input_size
    vision_cfg, embed_dim, _ = open_clip_vision_cfg(arch, dict(kwargs))
    timm_tower = bool(vision_cfg.get("timm_model_name"))
    model_kwargs: dict[str, Any] = {}
    if kwargs:  # a tiny tower: its own config, and the text tower (never compared) at its smallest
        text_cfg = {**open_clip.get_model_config(arch)["text_cfg"], **TINY_TEXT}
        model_kwargs = {"vision_cfg": vision_cfg | ({} if timm_tower else {"image_size": size}), "text_cfg": text_cfg,
                        "embed_dim": embed_dim}
    logging.disable(logging.WARNING)  # "No pretrained weights loaded ... initialized randomly": they are loaded below
    try:
        ref = open_clip.create_model(arch, pretrained=None, force_image_size=None if timm_tower else size, **model_kwargs)
    finally:
        logging.disable(logging.NOTSET)
    if weights.path is not None:
        state = load_state_dict(weights.path)
        if not kwargs and not all(k.startswith("visual.") for k in state):
            open_clip.load_checkpoint(ref, str(weights.path), strict=True)
            how = "open_clip.create_model + open_clip.load_checkpoint (strict)"
        else:
            from extract.backbones.openclip import visual_state_dict

            ref.visual.load_state_dict(visual_state_dict(weights.path, ref.visual), strict=True)
            how = "open_clip.create_model, the file's image tower loaded strictly (it holds no text tower)"
    else:
        ref.visual.load_state_dict({k.partition(".")[2]: v for k, v in model.state_dict().items()}, strict=True)
        how = "open_clip.create_model with medfm's random weights"
    native = vision_cfg.get("image_size", 224)
    if timm_tower and size != int(native[0] if isinstance(native, (tuple, list)) else native):
        ref.visual.set_input_size(size)  # as medfm does: timm's own resample, after loading
    ref.eval()
    visual = ref.visual
    last = model.num_layers - 1

    def intermediates(x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        out = visual.forward_intermediates(x, indices=indices, normalize_intermediates=True, output_fmt="NLC", intermediates_only=True)
        return list(out["image_intermediates"])

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.encode_image(x), intermediates(x, [last])[0]

    has_blocks = type(visual).__name__ in ("VisionTransformer", "TimmModel")
    return Reference(how + "; pooled = encode_image, tokens = visual.forward_intermediates (normed)", forward,
                     intermediates if has_blocks else None, module=ref)


def hf_reference(name: str, model: LibraryBackbone, weights: ResolvedWeights) -> Reference:
    from transformers import AutoModel

    from extract.backbones.by_name import _auto_model

    folder = Path(get_spec(name).extra["folder"])
    config = hf_config(folder, dict(model.library_kwargs))
    problems: list[str] = []
    if weights.path is not None and weights.path.is_dir():
        ref, info = hf_from_pretrained(weights.path, config)
        if (said := hf_load_problems(info)):
            problems.append(f"transformers' load report: {said}")
        how = "transformers AutoModel.from_pretrained (its load report checked)"
    elif weights.path is not None:  # transformers reads folders; a lone file goes through medfm's loader, strictly
        ref = hf_model(config, weights.path, name)
        how = "transformers AutoModel.from_config, the file's tensors loaded strictly by medfm's loader"
    else:
        ref = _auto_model(AutoModel.from_config, config)
        hf_image_side(ref).load_state_dict({k.partition(".")[2]: v for k, v in model.state_dict().items()}, strict=True)
        how = "transformers AutoModel.from_config with medfm's random weights"
    ref.eval()
    composite = hasattr(ref, "get_image_features") and hasattr(ref, "vision_model")
    vision = ref.vision_model if composite else ref
    kw = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(vision.forward).parameters else {}
    patch = getattr(getattr(config, "vision_config", None) or config, "patch_size", None)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = vision(pixel_values=x, **kw)
        final = out.last_hidden_state
        prefix = final.shape[1] - (x.shape[-1] // patch) ** 2 if final.ndim == 3 and patch else 0
        if composite:
            pooled = ref.get_image_features(pixel_values=x, **kw)
            pooled = getattr(pooled, "pooler_output", pooled)
        elif out.pooler_output is not None:
            pooled = out.pooler_output
        else:  # built without a pooler (ViT): the CLS token, or the mean where there is none
            pooled = final[:, 0] if prefix else final.mean(1)
        tokens = final[:, prefix:] if final.ndim == 3 else final.flatten(2).transpose(1, 2)
        return pooled.flatten(1) if pooled.ndim == 4 else pooled, tokens

    def blocks(x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """transformers' own block outputs (output_hidden_states), through the final norm where last_hidden_state has it."""
        out = vision(pixel_values=x, output_hidden_states=True, **kw)
        states, final = out.hidden_states, out.last_hidden_state
        if states is None or len(states) != model.num_layers + 1 or final.ndim != 3:
            raise MedfmError("transformers gives no output per block here")
        norms = [m for path, m in vision.named_modules() if path.rpartition(".")[2] in ("layernorm", "post_layernorm")]
        finish = next((f for f in [lambda h: h, *norms] if torch.allclose(f(states[-1]), final, atol=1e-6)), None)
        if finish is None:
            raise MedfmError("its last_hidden_state is neither the last block's output nor that output normed")
        prefix = final.shape[1] - (x.shape[-1] // patch) ** 2
        return [finish(states[i + 1])[:, prefix:] for i in indices]

    return Reference(how + "; pooled = pooler_output (get_image_features for a composite model), tokens = last_hidden_state, "
                     "blocks = hidden_states", forward, blocks if patch else None, problems, module=ref)


REFERENCES = {"timm": timm_reference, "open_clip": open_clip_reference, "hf": hf_reference}


# --- the check --------------------------------------------------------------------------------------------------------


def check_backbone(name: str, weights: str = "default", *, image_size: int | None = None, overrides: dict[str, Any] | None = None,
                   device: str = "auto", batch: int = BATCH, tolerance: float = TOLERANCE,
                   say: Callable[[str], object] = lambda _line: None) -> CheckReport:
    """Check `name` against its library and write the receipt; returns the report (its `failures` say what failed)."""
    parsed = parse_library_name(name)
    if parsed is None:
        raise MedfmError(f"check-backbone compares a backbone named by its library (timm:NAME, open_clip:ARCH[@PRETRAINED], hf:MODEL) "
                         f"with that library; {registry_row_hint(name)}")
    if batch < 1 or tolerance <= 0:
        raise MedfmError(f"--batch must be at least 1 and --tolerance above 0, got {batch} and {tolerance}")
    overrides = dict(overrides or {})
    spec = get_spec(name)
    resolved = resolve_weights(spec, weights)
    dev = resolve_device(device)
    report = CheckReport(name, resolved.identity, str(resolved.path) if resolved.path else None, image_size, tolerance=tolerance,
                         device=str(dev), versions=_versions(parsed.library),
                         checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        _run_checks(report, name, resolved, image_size, overrides, dev, batch, tolerance, say)
    finally:
        report.passed = not report.failures
        report.receipt = str(write_receipt(report, resolved))
    return report


def registry_row_hint(name: str) -> str:
    """What to check instead of a registry row: the library name a named row is built from, with its settings."""
    from extract.backbones.named import ROWS

    row = next((r for r in ROWS if r.name == name), None)
    if row is None or row.library == "hf":
        return (f"'{name}' is a registry row, which tests/extract/test_backbones_reference.py and test_backbones_named.py check "
                "against its library; give its library name to check your own weights")
    options = "".join(f" --override {k}={v}" for k, v in row.settings.items())
    return f"'{name}' is built from {row.library}:{row.model}; check your weights with: extract check-backbone {row.library}:{row.model}{options} --weights FILE"


def _run_checks(report: CheckReport, name: str, weights: ResolvedWeights, image_size: int | None, overrides: dict[str, Any],
                dev: torch.device, batch: int, tolerance: float, say: Callable[[str], object]) -> None:
    try:
        model = create_backbone(name, weights, image_size=image_size, **overrides).to(dev)
    except MedfmError as err:
        report.failures.append(f"load: {err}")
        report.load.append(str(err))
        return
    assert isinstance(model, LibraryBackbone)
    size = model.data_config.input_size
    report.image_size, report.worked_out = size, model.describe()
    say(f"worked out: {report.worked_out}")
    library = parse_library_name(name).library
    try:
        reference = REFERENCES[library](name, model, weights)
    except (MedfmError, RuntimeError, ValueError, OSError) as err:
        report.failures.append(f"reference: {library} cannot build or load it ({_one_line(err)})")
        return
    reference.module.to(dev)
    report.reference = reference.how
    report.load += reference.problems
    report.failures += [f"load: {p}" for p in reference.problems]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    every = list(range(model.num_layers))
    with torch.inference_mode():
        ours = model.forward_layers(x, every)
        pooled, tokens = reference.forward(x)
        last = ours[model.num_layers - 1]
        for what, mine, theirs in (("pooled", last.pooled, pooled), ("tokens", last.tokens, tokens)):
            c = compare(mine, theirs, tolerance)
            setattr(report, what, asdict(c) | {"passed": c.passed})
            say(f"{what}: medfm {tuple(c.shape)} vs reference {tuple(c.reference_shape)}" +
                (f", max abs error {c.max_abs_error:.3g}, mean {c.mean_abs_error:.3g} (bound {c.bound:.3g})" if c.max_abs_error is not None else ""))
            if (line := _said(f"{what} features", c)):
                report.failures.append(line + (f" (readout: {model.pooled_rule})" if what == "pooled" else ""))
        report.layers = {"count": model.num_layers, "mean_pooled_blocks": list(model.worked.mean_pooled_blocks), "compared": {}}
        try:
            if reference.blocks is None:
                raise MedfmError("the library gives no normed block outputs numbered as medfm's blocks")
            theirs_by_block = reference.blocks(x, every)
        except MedfmError as err:
            report.layers["compared"] = f"not compared: {err}"
        else:
            for index, theirs in zip(every, theirs_by_block, strict=True):
                c = compare(ours[index].tokens, theirs, tolerance)
                report.layers["compared"][str(index)] = c.max_abs_error
                if (line := _said(f"block {index}'s tokens", c)):
                    report.failures.append(line)
        compared = report.layers["compared"]
        errors = [e for e in compared.values() if e is not None] if isinstance(compared, dict) else []
        say(f"layers: {model.num_layers} blocks; " + (f"each block's tokens against the library's, max error {max(errors):.3g}"
                                                      if errors else str(compared)))
        report.seconds_per_image = _time_per_image(model, x, every[-1:])
    say(f"time: {report.seconds_per_image * 1000:.2f} ms per image on {dev} (batch {batch}, {size} px)")
    _check_224(report, name, weights, size, overrides, dev, say)
    _check_one_channel(report, name, weights, image_size, overrides, model, dev, tolerance, say)


def _check_224(report: CheckReport, name: str, weights: ResolvedWeights, size: int, overrides: dict[str, Any], dev: torch.device,
               say: Callable[[str], object]) -> None:
    """The study's input size: built at 224 px (position embeddings resized where the library allows), one forward."""
    if size == 224:
        report.at_224 = {"size": 224, "note": "the checked size"}
        say("224 px: the checked size")
        return
    try:
        model = create_backbone(name, weights, image_size=224, **{k: v for k, v in overrides.items() if k not in ("img_size", "image_size")}).to(dev)
        with torch.inference_mode():
            f = model(torch.zeros(1, 3, 224, 224, device=dev))
        report.at_224 = {"size": 224, "pooled": list(f.pooled.shape[1:]), "tokens": list(f.tokens.shape[1:])}
        say(f"224 px: pooled {tuple(f.pooled.shape[1:])}, tokens {tuple(f.tokens.shape[1:])}")
    except (MedfmError, RuntimeError, ValueError) as err:
        report.at_224 = {"size": 224, "error": _one_line(err)}
        report.failures.append(f"at 224 px: {_one_line(err)}")


def _check_one_channel(report: CheckReport, name: str, weights: ResolvedWeights, image_size: int | None, overrides: dict[str, Any],
                       model: Backbone, dev: torch.device, tolerance: float, say: Callable[[str], object]) -> None:
    """`--in-chans 1`: the first conv keeps the pretrained R-channel kernel, so a gray image's features are the
    three-channel model's on [gray, 0, 0]."""
    try:
        gray_model = create_backbone(name, weights, image_size=image_size, in_chans=1, **overrides).to(dev)
        size = model.data_config.input_size
        gray = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.inference_mode():
            ours = gray_model(gray)
            theirs = model(torch.cat([gray, torch.zeros_like(gray), torch.zeros_like(gray)], dim=1))
        c = compare(ours.pooled, theirs.pooled, tolerance)
        report.one_channel = {"first_conv": model.first_conv, "pooled": list(ours.pooled.shape[1:]), "tokens": list(ours.tokens.shape[1:]),
                              "max_abs_error_vs_rgb_with_zero_gb": c.max_abs_error}
        say(f"one channel: {model.first_conv} rebuilt from its R kernel; gray vs [gray, 0, 0] max error {c.max_abs_error:.3g}")
        if (line := _said("one-channel pooled features", c)):
            report.failures.append(line)
    except (MedfmError, RuntimeError, ValueError) as err:
        report.one_channel = {"error": _one_line(err)}
        report.failures.append(f"one channel: {_one_line(err)}")


def _time_per_image(model: Backbone, x: torch.Tensor, layers: list[int]) -> float:
    model.forward_layers(x, layers)  # warm-up
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.forward_layers(x, layers)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[1] / len(x)


# --- the receipt ------------------------------------------------------------------------------------------------------


def receipt_path(report: CheckReport, weights: ResolvedWeights) -> Path:
    """Beside the weights (`<file>.medfm-check.json`; a folder's sibling, never inside it: its sha256 covers every file),
    else $MEDFM_OUTPUT/checks/<name>-<sha256[:12] or random>.json (random weights, the hub cache, a read-only folder)."""
    path = weights.path
    if path is not None and not _in_hub_cache(path) and os.access(path.parent, os.W_OK):
        return path.with_name(f"{path.name}.medfm-check.json")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", report.backbone).strip("_")
    return output_root() / CHECKS / f"{slug}-{(weights.sha256 or 'random')[:12]}.json"


def _in_hub_cache(path: Path) -> bool:
    from huggingface_hub import constants

    try:
        return path.resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except OSError:
        return False


def write_receipt(report: CheckReport, weights: ResolvedWeights) -> Path:
    path = receipt_path(report, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    report.receipt = str(path)
    path.write_text(json.dumps(asdict(report) | {"passed": not report.failures}, indent=1, default=str) + "\n")
    return path


def _versions(library: str) -> dict[str, str]:
    found = {}
    for package in ("torch", {"hf": "transformers", "open_clip": "open_clip_torch"}.get(library, library)):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 400 else text[:400] + " ..."


__all__ = ["MEDFM_OPTIONS", "CheckReport", "check_backbone"]  # MEDFM_OPTIONS: the overrides that are medfm's own
