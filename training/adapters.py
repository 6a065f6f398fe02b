"""Parameter-efficient finetuning: LoRA, DoRA and IA3 adapters in a frozen backbone, through Hugging Face peft
(docs/protocol.md §9, an extension of the study).

`--adapter METHOD[:KEY=VALUE,...]` is parsed here without torch (`parse_adapter`), so a bad option is one line before
anything loads. `attach` injects the adapter into the layers of the backbone's blocks with peft's
`inject_adapter_in_model`: the layers named by `targets=`, else the family's own (`DEFAULT_TARGETS`). Everything else of
the backbone stays as loaded; the head trains in full. A run keeps only the adapter and the head (`saved_keys`), and
`load_adapter(model, path)` puts such a file back onto a model built with the run's base weights; `merge_adapter` folds
it into those weights. finetune trains with it and predict rebuilds a run with it, so it lives below both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import MedfmError
from common.registry import unknown
from ledger.records import ADAPTERS
from training.recipe import ADAPTER_RECIPES

if TYPE_CHECKING:  # torch and peft load when an adapter is attached, not when the command line checks one
    from torch import nn

LOW_RANK = ("r", "alpha", "dropout")  # the options of LoRA and DoRA; IA3 learns one scale per channel and has none
OPTIONS = {"lora": (*LOW_RANK, "targets"), "dora": (*LOW_RANK, "targets"), "ia3": ("targets",)}
# The layers an adapter wraps by default, the first rule whose signature layer the backbone's blocks hold:
# (signature, layer names, layer kind). Attention projections of the transformers, as LoRA's paper adapts them; SEEM's
# focal modulation in their place; OpenCLIP's MLP, because its attention is torch's nn.MultiheadAttention, which peft wraps
# for LoRA alone (`targets=attn` asks for it) and whose out_proj weight is read by the fused kernel, never through
# the layer; a CNN's bottleneck convolutions.
DEFAULT_TARGETS = (
    ("qkv", ("qkv", "proj"), "Linear"),  # timm ViTs (deit, dino, dinov2, blip, timm:vit_*), SAM
    ("f", ("f", "proj"), "Linear"),  # SEEM's focal modulation
    ("q_proj", ("q_proj", "k_proj", "v_proj", "o_proj"), "Linear"),  # Hugging Face ViTs (hf:, transformers 5)
    ("query", ("query", "key", "value"), "Linear"),  # Hugging Face ViTs (hf:, older transformers)
    ("c_fc", ("c_fc", "c_proj"), "Linear"),  # OpenCLIP
    ("conv2", ("conv1", "conv2", "conv3"), "Conv2d"),  # ResNet bottlenecks (resnet152, timm:resnet*)
)
KINDS = ("Linear", "Conv2d", "MultiheadAttention")  # what a target may be: the layers peft adapts


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter's settings; every option the method has is filled (from `training.recipe.ADAPTER_RECIPES`), so the
    run's key names them. `targets` None: the backbone family's default layers."""

    method: str
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        targets = data.get("targets")
        return cls(data["method"], data.get("r"), data.get("alpha"), data.get("dropout"), tuple(targets) if targets else None)

    @property
    def lr(self) -> float:
        """The recipe's learning rate for this method's parameters."""
        return ADAPTER_RECIPES[self.method].lr


def parse_adapter(text: str) -> AdapterSpec:
    """`lora`, `lora:r=8,alpha=16,dropout=0.1,targets=qkv+proj`, `dora:r=4`, `ia3:targets=qkv`: the method, then its
    options (`OPTIONS`), the rest from the recipe. A mistake is one line naming what is allowed."""
    method, _, rest = text.partition(":")
    if method not in ADAPTERS:
        raise unknown("adapter", method, ADAPTERS)
    recipe = ADAPTER_RECIPES[method]
    values: dict[str, Any] = {k: getattr(recipe, k) for k in OPTIONS[method] if k != "targets"}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or key not in OPTIONS[method]:
            example = "r=8,alpha=16,dropout=0.1,targets=qkv+proj" if "r" in OPTIONS[method] else "targets=qkv+proj"
            raise MedfmError(f"--adapter {text}: '{pair}' is not an option of {method}; it takes "
                             + ", ".join(f"{k}=" for k in OPTIONS[method]) + f" (e.g. {method}:{example})")
        values[key] = _option(text, key, value)
    return AdapterSpec(method, **values)


def _option(text: str, key: str, value: str) -> Any:
    """One option's value, checked: r a whole number >= 1, alpha > 0, 0 <= dropout < 1, targets `name+name`."""
    if key == "targets":
        names = tuple(dict.fromkeys(n.strip() for n in value.split("+") if n.strip()))
        if not names:
            raise MedfmError(f"--adapter {text}: targets= needs layer names joined by +, e.g. targets=qkv+proj")
        return names
    try:
        number = int(value) if key == "r" else float(value)
    except ValueError:
        number = math.nan
    if key == "r" and not (isinstance(number, int) and number >= 1):
        raise MedfmError(f"--adapter {text}: r= is the adapter's rank, a whole number of 1 or more, got '{value}'")
    if key == "alpha" and not 0 < number < math.inf:
        raise MedfmError(f"--adapter {text}: alpha= scales the adapter's update (alpha / r), a positive number, got '{value}'")
    if key == "dropout" and not 0 <= number < 1:
        raise MedfmError(f"--adapter {text}: dropout= is a probability in [0, 1), got '{value}'")
    return number


def resolve_targets(backbone: nn.Module, spec: AdapterSpec, name: str) -> tuple[str, ...]:
    """The names (in `backbone`) of the layers of its blocks the adapter wraps: those whose name is a target or ends
    with `.<target>` (`proj`, `attn.proj`), else the family's default (`DEFAULT_TARGETS`). None found is one line that
    lists the layers there are."""
    layers = _block_layers(backbone)
    listed = ", ".join(dict.fromkeys(n.rpartition(".")[2] for n, (kind, _) in layers.items() if kind != "MultiheadAttention"))
    if spec.targets is None:
        for signature, names, kind in DEFAULT_TARGETS:
            if any(n.rpartition(".")[2] == signature and k == kind for n, (k, _) in layers.items()):
                return tuple(n for n, (k, _) in layers.items() if n.rpartition(".")[2] in names and k == kind)
        raise MedfmError(f"{name}'s blocks hold none of the layers an adapter wraps by default; name them with "
                         f"--adapter {spec.method}:targets=NAME+NAME, among: {listed or 'none (no Linear or Conv2d layers)'}")
    chosen = set()
    for target in spec.targets:
        hits = {n for n in layers if n == target or n.endswith(f".{target}")}
        if not hits:
            raise MedfmError(f"--adapter targets={'+'.join(spec.targets)}: {name}'s blocks have no layer called '{target}'; "
                             f"their Linear and Conv2d layers are: {listed}")
        chosen |= hits
    return tuple(n for n in layers if n in chosen)


def _block_layers(backbone: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """name -> (kind, layer) of every layer peft adapts inside the backbone's blocks (`Backbone.blocks`), in model order;
    none in the stem or the readout, which no freeze policy trains either."""
    from torch import nn

    kinds = {kind: getattr(nn, kind) for kind in KINDS}
    inside = {id(m) for block in backbone.blocks for m in block.modules()}
    return {n: (next(k for k, cls in kinds.items() if isinstance(m, cls)), m) for n, m in backbone.named_modules()
            if id(m) in inside and isinstance(m, tuple(kinds.values()))}


@dataclass(frozen=True)
class Attached:
    """What was attached to a backbone: the spec and the layers it wraps (names in the backbone)."""

    spec: AdapterSpec
    targets: tuple[str, ...]


def attach(backbone: nn.Module, spec: AdapterSpec, name: str, targets: Iterable[str] | None = None) -> list[nn.Module]:
    """Inject the adapter into `backbone` (in place; `targets`: these layers, else `resolve_targets`) and return the
    layers that now hold it. The backbone's own weights stop training; the adapter's train. What peft refuses (DoRA on
    an attention module, say) is one line."""
    from peft import IA3Config, LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    chosen = tuple(targets) if targets is not None else resolve_targets(backbone, spec, name)
    if spec.method == "ia3":
        config = IA3Config(target_modules=list(chosen), feedforward_modules=[])  # each layer's output scaled per channel
    else:
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(chosen),
                            use_dora=spec.method == "dora")
    try:
        inject_adapter_in_model(config, backbone)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise MedfmError(f"--adapter {spec.method} on {name} ({', '.join(chosen[:3])}...): peft refuses it: "
                         f"{str(err).strip().splitlines()[0]}") from None
    backbone.attached_adapter = Attached(spec, chosen)
    layers = [m for n, m in backbone.named_modules() if n in chosen and isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.train(backbone.training)  # new modules start in train mode: an eval model stays one (LoRA's dropout off)
    return layers


def adapter_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of the adapters inside `module` (peft's own list of each layer's adapter parts)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = [f"{n}.{part}." if n else f"{part}." for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)
             for part in m.adapter_layer_names]
    return {k for k in module.state_dict() if k.startswith(tuple(parts))}


def saved_keys(model: nn.Module) -> set[str]:
    """What an adapter run keeps of `model` (backbone + head): the adapter and the whole head, nothing of the base."""
    return {f"backbone.{k}" for k in adapter_keys(model.backbone)} | {f"head.{k}" for k in model.head.state_dict()}


def adapter_file(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A run's adapter file (its `best.pt`): the adapter's settings and layers, and `state` (the `saved_keys` tensors)."""
    attached: Attached = model.backbone.attached_adapter
    return {"adapter": {**attached.spec.to_dict(), "layers": list(attached.targets)}, "model": state}


def load_adapter(model: nn.Module, path: Path) -> nn.Module:
    """Put an adapter run's `best.pt` onto `model`, a backbone + head (`finetune.model.FinetuneModel`, or any module with
    `backbone` and `head`) built with the run's base weights; returns `model`, the adapter attached and loaded. A file of
    anything else is one line."""
    from common.checkpoints import load_torch_file

    fix = "pass the best.pt of a finetune run trained with --adapter"
    saved = load_torch_file(Path(path), fix)
    if not (isinstance(saved, dict) and isinstance(saved.get("adapter"), dict) and isinstance(saved.get("model"), dict)):
        raise MedfmError(f"{path} holds no adapter (no 'adapter' settings beside its tensors); {fix}")
    settings = saved["adapter"]
    attach(model.backbone, AdapterSpec.from_dict(settings), "the run's backbone", settings["layers"])
    check_tensors(model, saved["model"], saved_keys(model), path, fix)
    model.load_state_dict(saved["model"], strict=False)
    return model


def check_tensors(model: nn.Module, state: Any, keys: set[str], path: Path, fix: str) -> None:
    """`state` holds exactly `model`'s `keys`, each with its shape; else one line saying how they differ, and `fix`."""
    if not isinstance(state, dict):
        raise MedfmError(f"{path} holds no tensors of a model where they belong; {fix}")
    own = model.state_dict()
    lacks, extra = sorted(keys - state.keys()), sorted(state.keys() - keys)
    wrong = [k for k in sorted(keys & state.keys()) if getattr(state[k], "shape", None) != own[k].shape]
    if lacks or extra or wrong:
        said = [f"{what} {', '.join(names[:2])}{f' and {len(names) - 2} more' if len(names) > 2 else ''}"
                for what, names in (("it lacks", lacks), ("it has", extra), ("another shape for", wrong)) if names]
        raise MedfmError(f"{path} holds other tensors than this model's ({'; '.join(said)}); {fix}")


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and drop it (peft's merge and unload of each adapted layer), in place:
    the plain model, as fast as the base, giving the logits of base + adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outermost = [n for n in adapted if not any(n.startswith(f"{o}.") for o in adapted)]  # peft's MHA holds one inside
    for name in outermost:
        layer = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        if hasattr(layer, "unload_and_optionally_merge_module"):
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        setattr(model.get_submodule(parent), child, plain)
    for owner in model.modules():
        if isinstance(getattr(owner, "attached_adapter", None), Attached):
            del owner.attached_adapter
    return model
