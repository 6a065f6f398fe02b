"""A finished run rebuilt to score images: its backbone, its exact input pipeline and its trained head.

A probe run trained its head on cached features, so its cache's meta says how they were made: the backbone, the weights
(identity and sha256), the constructor overrides, the transform, the precision, the token dtype and the protocol. The
backbone is rebuilt from those with extract's `create_backbone`, run as extraction runs it (`BackboneForward`, the same
autocast), and its feature is rounded to the dtype the cache stored before the head (`head.pt`) sees it, so an image
gets the logits its cached row got. A finetune run's `best.pt` holds backbone and head together (an adapter run's, only
the adapter and the head: they go onto its base weights, found as a probe's are, or its seeded random start, and are
merged into them, `training.adapters`); its transform comes from its recorded input settings through
`extract.inputs.input_spec`, and it runs in fp32, as its test split was scored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.schema import Task
from cache.store import CacheReader
from common.checkpoints import load_into, load_state_dict
from common.errors import MedfmError
from extract.backbones import Backbone, create_backbone, get_spec
from extract.backbones.weights import ResolvedWeights, resolve_weights, take_prefix
from extract.datasets import get_dataset
from extract.datasets.base import DatasetSource
from extract.inputs import input_spec
from extract.runner import BackboneForward, quantize
from extract.transforms import TransformSpec
from ledger.records import RunRecord
from ledger.runs import RunConfig
from ledger.store import Ledger
from training.adapters import load_adapter, merge_adapter
from training.heads import REGISTRY as HEADS
from training.heads import build_head

Logits = Callable[[torch.Tensor], torch.Tensor]  # transformed images [B, C, H, W] -> logits [B, outputs], fp32 on the CPU


@dataclass(frozen=True)
class RunModel:
    """A run ready for images: what prepares them (`transform`) and what turns a batch of them into logits."""

    record: RunRecord
    task: Task
    transform: TransformSpec
    logits: Logits


def find_run(ledger: Ledger, run: str) -> RunRecord:
    """The run named by its ledger id or its run folder, as `probe eval` takes it."""
    if re.fullmatch(r"\d+", run):
        found = ledger.rows(id=int(run))
    else:
        folder = Path(run).expanduser().resolve()
        found = [r for r in ledger.rows() if r.run_dir and Path(r.run_dir).resolve() == folder]
    if not found:
        raise MedfmError(f"no run {run} in the ledger {ledger.path}; name a run by its ledger id (the ledger's `id` column) or "
                         "its run folder (which `probe run` and `finetune run` print)")
    return found[-1]


def load_run_model(record: RunRecord, config: RunConfig, images: DatasetSource, device: torch.device,
                   weights: str | None = None) -> RunModel:
    """The run's model on `device`, for `images`; `weights` replaces the backbone weights a probe's cache names (a file needs it)."""
    if record.stage == "finetune":
        if weights is not None and not config.config.get("adapter"):
            raise MedfmError(f"run {record.id} was finetuned: its backbone's weights are its own (best.pt); leave out --weights")
        return _finetune_model(record, config, images, device, weights)
    return _probe_model(record, config, device, weights)


def _probe_model(record: RunRecord, config: RunConfig, device: torch.device, weights: str | None) -> RunModel:
    spec = HEADS.entries.get(record.head)
    if spec is None or not spec.trains:
        raise MedfmError(f"run {record.id} is a {record.head} probe, which keeps no trained head; predict uses trained heads "
                         f"({', '.join(s.name for s in HEADS.values() if s.trains)})")
    head_file = Path(record.run_dir or "") / "head.pt"
    if not head_file.is_file():
        raise MedfmError(f"run {record.id}: its head ({head_file}) is missing; retrain it with --force")
    cache = Path(config.cache or "")
    if not cache.is_file():
        raise MedfmError(f"run {record.id}'s cache {cache} is gone; predict reads how the features were made from it "
                         "(extract it again with the run's settings)")
    with CacheReader(cache) as reader:
        meta = reader.meta
    settings = meta.settings
    if "transform" not in settings:
        raise MedfmError(f"{cache} records no extraction settings, so its backbone and inputs cannot be rebuilt; "
                         "re-extract it with `extract run`")
    transform = TransformSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["transform"].items()})
    what = f"run {record.id} ({config.config['feature']} of {meta.backbone.name})"
    backbone = _backbone(settings["backbone"], _weights(settings, weights, what), what, image_size=transform.size,
                         in_chans=transform.channels, protocol=settings.get("protocol", "medfm"), **settings.get("overrides", {}))
    kind, _, block = config.config["feature"].partition("@")
    layer = int(block) if block else meta.num_layers - 1
    precision = settings.get("precision", "fp32")
    forward = BackboneForward(backbone, [layer], device, None if precision == "fp32" else getattr(torch, precision))
    token_dtype = settings.get("token_dtype", "float16")
    quantized = kind == "tokens" and token_dtype == "int8"
    stored = torch.float32 if kind == "pooled" or quantized else getattr(torch, token_dtype)

    def feature(images: torch.Tensor) -> torch.Tensor:
        """The feature as the cache stored it (int8 tokens: quantized per token), then as the probe read it (fp32)."""
        raw = getattr(forward(images)[layer], kind)
        if quantized:
            values, scales = quantize(raw)
            return values.float() * scales[..., None]
        return raw.to(stored).float()

    zeros = torch.zeros(1, transform.channels, transform.size, transform.size)
    head = _head(record.head, config, tuple(feature(zeros).shape[1:]), head_file, device)
    return RunModel(record, config.task_spec, transform, _scored(lambda images: head(feature(images))))


def _finetune_model(record: RunRecord, config: RunConfig, images: DatasetSource, device: torch.device,
                    weights: str | None) -> RunModel:
    c = config.config
    best = Path(record.run_dir or "") / "best.pt"
    if not best.is_file():
        raise MedfmError(f"run {record.id}: its weights ({best}) are missing; finish or retrain it with `finetune run`")
    what = f"run {record.id} (finetuned {record.backbone})"
    base = _weights(c, weights, what) if c.get("adapter") else ResolvedWeights("random", None, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(record.seed)  # a random base is the run's seeded start, as finetune seeds it
        backbone = _backbone(c["backbone"], base, what, image_size=c.get("image_size"), in_chans=c.get("in_chans", 3),
                             protocol=c.get("protocol", "medfm"), **c.get("overrides", {}))
    reads = HEADS.get(c["head"]).reads
    row_shape = (backbone.pooled_dim,) if reads == "pooled" else backbone.token_shape()
    head = _head(c["head"], config, row_shape, None, device)
    if c.get("adapter"):
        merge_adapter(load_adapter(nn.ModuleDict({"backbone": backbone, "head": head}), best))
    else:
        state = load_state_dict(best)  # backbone and head, as `finetune.model.FinetuneModel` holds them
        backbone.load_state_dict(take_prefix(state, "backbone."))
        head.load_state_dict(take_prefix(state, "head."))
    norm, interpolation = c.get("norm", "model"), c.get("interpolation", "model")
    # per-dataset statistics (--norm dataset|study) are recomputed from the training data, as the run computed them
    source = images if norm == "model" else get_dataset(c["dataset"], c.get("root"), **c.get("dataset_options", {}))
    transform, _ = input_spec(source, backbone.data_config, norm, c.get("in_chans", 3), interpolation, None)
    backbone.to(device).eval()
    return RunModel(record, config.task_spec, transform,
                    _scored(lambda x: head(getattr(backbone(x.to(device)), reads))))


def _weights(settings: dict[str, Any], weights: str | None, what: str) -> ResolvedWeights:
    """The weights the cache's features came from, found on this machine (or `weights`), checked by their sha256."""
    identity = settings.get("weights") or {}
    spec = _spec(settings["backbone"], what)
    if weights is None and identity.get("kind") == "random":
        return ResolvedWeights("random", None, None, seed=int(identity.get("seed", 0)))  # the same draw as the cache's
    if weights is None and identity.get("kind") == "file":
        raise MedfmError(f"{what} was extracted with the weights file {identity.get('file')}; pass it with --weights PATH")
    try:
        resolved = resolve_weights(spec, weights or "default")
    except MedfmError as err:
        raise MedfmError(f"{what}: {err}") from None
    wanted = identity.get("sha256")
    if resolved.sha256 != wanted:
        made = f"weights of sha256 {wanted[:12]} ({identity.get('file')})" if wanted else "random weights"
        hint = "pass that file with --weights PATH" if wanted else "leave out --weights"
        raise MedfmError(f"{what} was extracted with {made}, not {resolved.path.name if resolved.path else 'random weights'}; {hint}")
    return resolved


def _spec(name: str, what: str) -> Any:
    try:
        return get_spec(name)
    except MedfmError as err:
        raise MedfmError(f"{what}: its backbone is not available here ({err}); predict rebuilds it to read the images") from None


def _backbone(name: str, weights: ResolvedWeights, what: str, **settings: Any) -> Backbone:
    try:
        return create_backbone(name, weights, **settings)
    except MedfmError as err:
        raise MedfmError(f"{what}: its backbone cannot be rebuilt here ({err})") from None


def _head(name: str, config: RunConfig, row_shape: tuple[int, ...], state: Path | None, device: torch.device) -> nn.Module:
    """The run's head, its pretrained part left random: every weight comes from the run's saved state."""
    c, spec = config.config, HEADS.get(name)
    options = {o: c[f"head_{o}"] for o in spec.options if f"head_{o}" in c}
    if "weights" in spec.options:
        options["weights"] = "random"  # no pretrained file is looked for: the saved state replaces every weight
    head = build_head(name, row_shape, config.task_spec.num_outputs, protocol=c.get("protocol", "medfm"), **options)
    if state is not None:
        load_into(head, state, f"the run's {name} head", "it is not the head this run saved; retrain the run with --force")
    return head.to(device).eval()


def _scored(logits: Logits) -> Logits:
    """`logits` without autograd, in fp32, back on the CPU."""

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return logits(images).float().cpu()

    return run
