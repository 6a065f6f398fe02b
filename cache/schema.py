"""The written contract between the stages: what a cache says about itself, typed and checked in one place.

`extract` writes a `CacheMeta` into every cache; `probe` and `finetune` read the same classes back.
- `Task`: what is predicted and how it is scored. The metric must be one of the vocabulary of its kind
  (`METRICS`), checked when the task is declared, so a typo fails where it is written, not at probe time.
- Feature keys: the arrays of one block are `pooled` / `tokens` for the last block and `pooled@K` /
  `tokens@K` for block K (0-based, non-negative). `feature_key` resolves a user's layer index (`-4` too)
  against the cache's block count, so extract and probe can never disagree on a name.
- `CacheMeta`: the backbone, dataset, task, transform and layers of a cache, as JSON in the file's
  `meta` attribute (docs/architecture.md, "The cache").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from common.errors import MedfmError

TASK_KINDS = ("multiclass", "binary", "multilabel")
# The metric vocabulary: every name `scoring.metrics` computes, per task kind. The first is the kind's default.
METRICS: dict[str, tuple[str, ...]] = {
    "multiclass": ("accuracy", "macro_recall", "quadratic_kappa", "roc_auc"),
    "binary": ("roc_auc", "accuracy", "macro_recall", "quadratic_kappa"),
    "multilabel": ("mean_roc_auc",),
}
# "medfm": medfm's own behaviour; "study": the official code's where the two differ (docs/protocol.md §7).
PROTOCOLS = ("medfm", "study")
FEATURE_KINDS = ("pooled", "tokens")  # pooled [N, D] feeds a linear head; tokens [N, T, D] a DeiT head
VIEW_PREFIX = "train+view"  # group of augmented train view v: `train+view<v>`; `train` itself is the eval view


def view_group(view: int) -> str:
    """The cache group holding augmented train view `view` (0-based): same ids and labels as `train`, its own features."""
    return f"{VIEW_PREFIX}{view}"


@dataclass(frozen=True)
class Task:
    """What is predicted and how it is scored; it travels inside the cache and every run.

    `primary_metric` selects the model (validation) and is the reported score; empty means the kind's default.
    """

    kind: str  # multiclass | binary | multilabel
    class_names: tuple[str, ...]
    primary_metric: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise MedfmError(f"task kind '{self.kind}' is not one of {', '.join(TASK_KINDS)}")
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if not self.class_names:
            raise MedfmError(f"a {self.kind} task needs at least one class name")
        if not self.primary_metric:
            object.__setattr__(self, "primary_metric", METRICS[self.kind][0])
        if self.primary_metric not in METRICS[self.kind]:
            raise MedfmError(f"metric '{self.primary_metric}' is not defined for {self.kind} tasks; "
                             f"choose one of {', '.join(METRICS[self.kind])}")

    @property
    def num_outputs(self) -> int:
        """Logits a head produces: one per class (two for binary, softmax as the study), one per label."""
        return max(2, len(self.class_names)) if self.kind == "binary" else len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "class_names": list(self.class_names), "primary_metric": self.primary_metric}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls(data["kind"], tuple(data["class_names"]), data.get("primary_metric", ""))


def check_protocol(protocol: str) -> str:
    """`protocol` if it is one of `PROTOCOLS`, else a one-line user error (every stage's `--protocol`)."""
    if protocol not in PROTOCOLS:
        raise MedfmError(f"--protocol must be medfm or study, got {protocol!r}")
    return protocol


# Extraction settings that say which data was read, not how features were computed from it (`feature_settings`):
# the dataset, its files and split, the augmented train views, a test view's corruption, and which blocks were stored.
DATA_SETTINGS = ("dataset", "root", "dataset_options", "manifest_hash", "views", "corrupt", "layers", "tokens")
# Normalisation kinds whose mean/std are the dataset's own (its train statistics, the study's per-dataset constants).
PER_DATASET_NORMS = ("dataset", "study")


def feature_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide how images become features (backbone, weights, overrides, transform, decoder,
    precision, protocol, token dtype, normalisation kind), without those that say which images: a head trained on one
    cache scores another (`probe eval`) only when these are equal. The normalisation values count only when they are
    the backbone's own (`norm` kind `model`); per-dataset statistics differ from dataset to dataset by design."""
    kept = {key: value for key, value in settings.items() if key not in DATA_SETTINGS}
    norm = settings.get("norm")
    kind = norm.get("kind") if isinstance(norm, dict) else norm
    if "norm" in kept:
        kept["norm"] = kind
    if kind in PER_DATASET_NORMS and isinstance(kept.get("transform"), dict):
        kept["transform"] = {k: v for k, v in kept["transform"].items() if k not in ("mean", "std")}
    return kept


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """A block index as users write it (None: the last; negative: from the end, -1 the last) -> 0..num_layers-1."""
    index = num_layers - 1 if layer is None else (layer + num_layers if layer < 0 else layer)
    if not 0 <= index < num_layers:
        raise MedfmError(f"layer {layer} is out of range for a backbone of {num_layers} blocks "
                         f"(use 0..{num_layers - 1}, or -1..-{num_layers} from the end)")
    return index


def feature_key(kind: str, layer: int | None, num_layers: int) -> str:
    """The array name of `kind` at block `layer` of a `num_layers`-block backbone (see `resolve_layer`).

    Negative indices count from the end, as in `extract --layers -1,-4`: block -4 of 12 is `pooled@8`.
    """
    if kind not in FEATURE_KINDS:
        raise MedfmError(f"feature kind '{kind}' is not one of {', '.join(FEATURE_KINDS)}")
    index = resolve_layer(layer, num_layers)
    return kind if index == num_layers - 1 else f"{kind}@{index}"


@dataclass(frozen=True)
class BackboneInfo:
    """Which backbone and weights produced the features (`weights` is the fingerprinted identity)."""

    name: str
    study_row: str = ""
    random_weights: bool = False
    weights: dict[str, Any] = field(default_factory=dict)  # kind, file, sha256


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    manifest_hash: str = ""


@dataclass(frozen=True)
class CacheMeta:
    """Everything a reader of a cache needs to know about it, beside the arrays themselves.

    `layers` are the stored blocks (sorted, non-negative; the last block, `num_layers - 1`, always among them);
    `settings` are the extraction settings whose hash is the cache's fingerprint.
    """

    backbone: BackboneInfo
    dataset: DatasetInfo
    task: Task
    layers: tuple[int, ...]
    num_layers: int
    settings: dict[str, Any] = field(default_factory=dict)
    transform: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # ids of unreadable images left out (--skip-bad)
    created: str = ""
    views: int = 0  # augmented train views stored beside the eval view (`view_group`); 0: none
    augment: str = "none"  # the augmentation the views were drawn with (extract.transforms.AUGMENTS)
    extract_seconds: float = 0.0  # wall seconds the extraction took, summed over resumed runs and shards (0: not recorded)
    extract_device: str = ""  # where it ran (`common.runtime.device_label`); "": not recorded
    # a corrupted test view (`extract run --corrupt KIND:SEVERITY`): {"kind": ..., "severity": ..., "seed": ...}; {}: clean
    corruption: dict[str, Any] = field(default_factory=dict)
    # how this dataset's classes map onto a partner's, for scoring a head trained there on this cache (`probe eval`):
    # {partner dataset: {own class: partner class, or None where it has none}}; from extract/datasets/labelmaps/
    label_maps: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers or max(self.layers) != self.num_layers - 1 or min(self.layers) < 0:
            raise MedfmError(f"cache meta: layers {list(self.layers)} must be block indices of 0..{self.num_layers - 1} "
                             "including the last")

    def feature(self, kind: str, layer: int | None = None) -> str:
        """The array of `kind` at `layer` (see `feature_key`), checked against the blocks this cache stored."""
        name = feature_key(kind, layer, self.num_layers)
        if resolve_layer(layer, self.num_layers) not in self.layers:
            stored = ", ".join(f"{i} ({i - self.num_layers})" for i in self.layers)
            raise MedfmError(f"the cache stores blocks {stored} of {self.num_layers}, not layer {layer}; "
                             "re-extract with --layers including it")
        return name

    def to_json(self) -> str:
        data = asdict(self)
        data["task"] = self.task.to_dict()
        return json.dumps(data, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = "the cache") -> CacheMeta:
        """Parse and check a cache's meta; a file that lacks a piece is one clear error."""
        try:
            data = json.loads(text)
            layers = tuple(int(i) for i in data["layers"])
            return cls(
                backbone=BackboneInfo(**data["backbone"]),
                dataset=DatasetInfo(**data["dataset"]),
                task=Task.from_dict(data["task"]),
                layers=layers,
                num_layers=int(data.get("num_layers", max(layers) + 1)),
                settings=data.get("settings", {}),
                transform=data.get("transform", {}),
                skipped=tuple(data.get("skipped", ())),
                created=data.get("created", ""),
                views=int(data.get("views", 0)),
                augment=data.get("augment", "none"),
                extract_seconds=float(data.get("extract_seconds", 0.0)),
                extract_device=str(data.get("extract_device", "")),
                corruption=dict(data.get("corruption") or {}),
                label_maps={str(k): dict(v) for k, v in (data.get("label_maps") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MedfmError(f"{where} lacks the backbone, dataset, task or layer description a reader needs "
                             f"({type(err).__name__}: {err}); re-create it with `extract run`") from None

    def with_skipped(self, ids: Sequence[str]) -> CacheMeta:
        return replace(self, skipped=(*self.skipped, *ids))

    def with_cost(self, seconds: float, device: str) -> CacheMeta:
        """`seconds` more of extraction (a resumed run adds to what the killed one recorded), on `device`."""
        return replace(self, extract_seconds=self.extract_seconds + float(seconds), extract_device=device or self.extract_device)
