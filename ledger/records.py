"""What the ledger stores, typed: a run's row (`RunRecord`), an evaluation's row (`EvaluationRecord`), the dataset
identity that makes a report column, the skip-if-done key, and the rule that picks a configuration over its seeds.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from cache.fingerprint import canonical_json
from cache.schema import CacheMeta

STAGES = ("probe", "finetune")
# Parameter-efficient finetuning methods (`training/adapters.py`, docs/protocol.md §9): scenarios <method>-<head>.
ADAPTERS = ("lora", "dora", "ia3")
# The study's four scenarios, frozen|unfrozen x linear|deit, plus partial unfreezing of the last K blocks, adapters on a
# frozen backbone, and the kNN probe on frozen features (frozen-knn) and CLIP zero-shot on them (zero-shot, `probe/zeroshot.py`).
SCENARIO = re.compile(rf"(frozen|unfrozen|last[1-9][0-9]*|{'|'.join(ADAPTERS)})-(linear|deit)|frozen-knn|zero-shot")
# Loaders of your own data: their name alone does not say which images, so a label carries a content tag.
OWN_DATA = ("imagefolder", "csv", "medmnist")
LATE_FRACTION = 10  # a best epoch in the last tenth of the epochs: perhaps not converged


def config_key(config: dict[str, Any], fingerprint: str | None, seed: int) -> str:
    """Identity of a result: the training config (no paths or devices in it), the features and the seed."""
    text = canonical_json({"config": config, "cache_fingerprint": fingerprint, "seed": seed})
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """`git describe` of the source tree when it is a checkout, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version("medfm")
    except metadata.PackageNotFoundError:
        return "unknown"


CONTENT = ("dataset", "root", "options", "manifest_hash")  # which data: what two scores must share to share a column
INPUTS = ("image_size", "channels", "norm", "interpolation")  # how a backbone was fed it: a property of the row
STUDY_FIXED = ("image_size", "channels", "norm")  # inputs the study holds equal for every backbone (docs/protocol.md §3)


@dataclass(frozen=True)
class DatasetIdentity:
    """Which data (the report's column), and how it was fed (a property of the row)."""

    id: str  # 12 hex digits of the content: name, root, options, split manifest
    label: str  # the dataset's name, or `name:tag` for your own data (tag: 4 hex digits of the content)
    inputs: dict[str, Any]  # root, options, manifest hash, image size, channels, norm, interpolation; {} when unrecorded


def _short(obj: Any, digits: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:digits]


def dataset_identity(name: str, *, root: str | None, manifest_hash: str, options: dict[str, Any] | None,
                     image_size: int | None, channels: int | None, norm: str | None, interpolation: str | None) -> DatasetIdentity:
    """The identity of a dataset as a run saw it: its content (name, root, options, split manifest) and the inputs
    made of it (size, channels, normalisation kind, resize interpolation), as probe (from the cache) and finetune
    (from its transform) both record them."""
    content = {"dataset": name, "root": root, "options": options or {}, "manifest_hash": manifest_hash}
    inputs = {"image_size": image_size, "channels": channels, "norm": norm, "interpolation": interpolation}
    label = f"{name}:{_short(content, 4)}" if name in OWN_DATA else name
    return DatasetIdentity(_short(content), label, {**content, **inputs})


def unrecorded_identity(name: str) -> DatasetIdentity:
    """The identity of a row that recorded only the dataset's name (ledgers before `dataset_id`, hand-made rows)."""
    return DatasetIdentity(_short({"dataset": name, "inputs": "unrecorded"}), name, {})


def late_best(best_epoch: int, epochs: int) -> bool:
    """Whether the best validation epoch (1-based) is in the last tenth of `epochs`: the run may still be improving."""
    return epochs >= 1 and best_epoch > epochs - math.ceil(epochs / LATE_FRACTION)


def late_best_note(best_epoch: int, epochs: int, hint: str = "raise --epochs") -> str:
    """The one line said at the end of a run flagged `late_best`."""
    return (f"note: the best validation epoch is {best_epoch} of {epochs}, in the last tenth: the run may not have "
            f"converged; {hint}")


@dataclass
class RunRecord:
    """One finished run, as the ledger stores it (`id` and `created` are filled on `add`)."""

    stage: str
    scenario: str
    backbone: str
    dataset: str
    head: str
    config: dict[str, Any]
    config_key: str
    cache_fingerprint: str | None
    seed: int
    primary_metric: str
    val_score: float | None
    test_metrics: dict[str, Any]
    test_primary: float | None
    backbone_random: bool
    head_random: bool = False
    train_seconds: float | None = None
    total_seconds: float | None = None
    code_version: str = field(default_factory=code_version)
    run_dir: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    dataset_id: str = ""  # see `dataset_identity`; empty: filled on `add` from the dataset name alone
    dataset_label: str = ""
    dataset_inputs: dict[str, Any] = field(default_factory=dict)
    late_best: bool = False  # the best validation epoch in the last tenth (`late_best`)
    collapsed: bool = False  # test predictions one class for > 95 % of rows (`scoring.health`)
    chance: bool = False  # the test primary metric is not above its chance level beyond noise (`scoring.health`)
    device: str = ""  # see _COST_COLUMNS; "" and None: not recorded
    cost_seconds: float | None = None
    throughput: float | None = None
    extract_seconds: float | None = None
    extract_device: str = ""
    id: int | None = None

    @property
    def protocol(self) -> str:
        """The setting a run belongs to, as the study would name it, apart from how it was computed: "study" for every
        run of the study's protocol (its frozen heads augment every epoch, whether from cached views or live images, so
        a probe on 100 cached views and a frozen DeiT head trained end to end are cells of one setting, compared with
        one baseline); "medfm" (the default, and every run before the field) for medfm's own, where heads on K augmented
        cached views are a setting of their own (`medfm, 3 augmented views`), never one cell with eval-view heads."""
        protocol = str(self.config.get("protocol", "medfm"))
        views = int(self.config.get("views", 0) or 0)
        return f"{protocol}, {views} augmented views" if views and protocol != "study" else protocol

    @property
    def null_draw(self) -> int:
        """The random-weight draw of a null backbone's run (`extract run --weights random:k`, k >= 1); 0 for any other."""
        return int(self.config.get("backbone_seed", 0) or 0)

    @property
    def computed(self) -> str:
        """How the run was computed: on cached features (`cached eval view`, `100 cached augmented views`) or on live
        images (`live images`)."""
        if self.stage == "finetune":
            return "live images"
        views = int(self.config.get("views", 0) or 0)
        return f"{views} cached augmented views" if views else "cached eval view"

    @property
    def data_id(self) -> str:
        """The report's column: the data alone (name, root, options, split manifest), however each backbone fed it.
        Rows recorded before the identity left out the inputs (their `dataset_id` hashed both) get it from their
        recorded settings; rows without recorded settings keep their `dataset_id`."""
        if not self.dataset_inputs:
            return self.dataset_id
        return _short({k: self.dataset_inputs.get(k, {} if k == "options" else None) for k in CONTENT})

    @property
    def fed(self) -> dict[str, Any]:
        """How the backbone was fed the data (`INPUTS`): {} when not recorded."""
        return {k: self.dataset_inputs[k] for k in INPUTS if k in self.dataset_inputs}

    def with_identity(self, identity: DatasetIdentity) -> RunRecord:
        self.dataset_id, self.dataset_label, self.dataset_inputs = identity.id, identity.label, identity.inputs
        return self


def configuration_key(record: RunRecord) -> str:
    """What a run shares with its other seeds and folds: its config (which holds no seed; its fold left out), features,
    data and how it was fed."""
    config = {k: v for k, v in record.config.items() if k != "fold"}
    return canonical_json({"config": config, "cache": record.cache_fingerprint, "dataset": record.dataset_id,
                           **({"fed": record.fed} if record.fed else {})})


def replicate(record: RunRecord) -> tuple[int, int]:
    """Which replicate of its configuration a run is: its seed and its cross-validation fold (0 without folds)."""
    return record.seed, int(record.config.get("fold", 0))


def mean_score(values: list[float | None]) -> float:
    """Mean of the finite values; NaN when there is none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def best_configuration(records: list[RunRecord]) -> list[RunRecord]:
    """The seeds of the configuration with the best mean validation score, the rule of `probe sweep` and of the
    report alike; a configuration without a finite validation score never wins over one with it ([] if no runs)."""
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(configuration_key(r), []).append(r)
    if not groups:
        return []

    def score(runs: list[RunRecord]) -> float:
        mean = mean_score([r.val_score for r in runs])
        return mean if math.isfinite(mean) else -math.inf

    return max(groups.values(), key=score)


@dataclass
class EvaluationRecord:
    """A run's head scored on another cache (`probe eval`), as the ledger's `evaluations` table stores it."""

    run_id: int
    run_key: str  # the run's config_key
    trained_dataset_id: str  # the run's dataset identity
    dataset: str  # the evaluated cache's dataset and its identity (`dataset_identity`)
    dataset_id: str
    dataset_label: str
    corruption_kind: str  # "" for a clean cache
    corruption_severity: float | None
    cache: str
    cache_fingerprint: str
    primary_metric: str  # the head's task's, as its run was scored
    score: float | None
    metrics: dict[str, Any]  # every metric, plus what the label map left out
    scored_rows: int
    dropped_rows: int = 0
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    id: int | None = None


def cache_identity(meta: CacheMeta) -> DatasetIdentity:
    """The dataset identity of a cache's features (`ledger.store.dataset_identity`) from its recorded settings."""
    settings = meta.settings
    if not settings:
        return unrecorded_identity(meta.dataset.name)
    transform = settings.get("transform") or meta.transform
    norm = settings.get("norm")
    return dataset_identity(
        meta.dataset.name, root=settings.get("root"), manifest_hash=meta.dataset.manifest_hash or settings.get("manifest_hash", ""),
        options=meta.dataset.options, image_size=transform.get("size"), channels=transform.get("channels"),
        norm=norm.get("kind") if isinstance(norm, dict) else norm, interpolation=transform.get("interpolation"),
    )
