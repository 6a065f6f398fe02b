"""`medmnist`: any 2D MedMNIST set from its local `.npz` file, with the file's own train/val/test splits.

The file holds `{train,val,test}_images` ([N, H, W] grayscale or [N, H, W, 3] colour, uint8) and
`{train,val,test}_labels` ([N, 1] class index, or [N, C] 0/1 for multilabel sets such as ChestMNIST).
The task follows the label shape (multilabel when C > 1, binary for two classes, else multiclass);
`--opt task=...` overrides it and `--opt classes=a,b,...` names the classes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from cache.schema import TASK_KINDS
from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Split, Task, choice, require_root
from extract.datasets.registry import DatasetEntry, register

SPLITS = ("train", "val", "test")
LAYOUT = "a MedMNIST .npz file (--root FILE.npz, or a folder with one .npz) holding {train,val,test}_{images,labels}"


def find_file(root: Path) -> Path:
    if root.is_file():
        return root
    files = sorted(root.glob("*.npz"))
    if len(files) != 1:
        raise MedfmError(f"{root} holds {len(files)} .npz files; pass --root FILE.npz (dataset 'medmnist' expects {LAYOUT})")
    return files[0]


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise MedfmError(f"cannot read {path} as a .npz file: {err}") from None
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise MedfmError(f"{path} lacks array(s) {', '.join(missing)}; dataset 'medmnist' expects {LAYOUT}")
    return arrays


def infer_kind(labels: list[np.ndarray]) -> str:
    if labels[0].ndim == 2 and labels[0].shape[1] > 1:
        return "multilabel"
    return "binary" if int(max(lab.max(initial=0) for lab in labels)) + 1 == 2 else "multiclass"


def build(root: Path | None, *, task: str = "auto", classes: str = "") -> DatasetSource:
    task = choice(task, "task", ("auto", *TASK_KINDS))
    path = find_file(require_root(root, "medmnist", LAYOUT, file_ok=True))
    arrays = load_arrays(path)
    raw = [arrays[f"{s}_labels"] for s in SPLITS]
    kind = infer_kind(raw) if task == "auto" else task
    if kind == "multilabel":
        labels = [lab.astype(np.float32).reshape(len(lab), -1) for lab in raw]
        n_classes = labels[0].shape[1]
    else:
        labels = [lab.astype(np.int64).reshape(-1) for lab in raw]
        n_classes = int(max(lab.max(initial=0) for lab in labels)) + 1
    names = tuple(c.strip() for c in classes.split(",")) if classes else tuple(str(i) for i in range(n_classes))
    if len(names) != n_classes:
        raise MedfmError(f"--opt classes names {len(names)} classes but {path.name} has {n_classes}")
    splits = {
        s: Split([f"{s}-{i:06d}" for i in range(len(lab))], lab, arrays[f"{s}_images"])
        for s, lab in zip(SPLITS, labels, strict=True)
    }
    return DatasetSource(
        name="medmnist",
        task=Task(kind, names),
        splits=splits,
        grayscale=arrays["train_images"].ndim == 3,
        load_image=Image.fromarray,
        options={"file": path.name, "task": kind, "classes": list(names)},
    )


register(DatasetEntry(
    name="medmnist", description="a local MedMNIST 2D set (.npz), any size",
    task="from the labels: multiclass (accuracy), binary (ROC-AUC) or multilabel (mean ROC-AUC)", layout=LAYOUT,
    build=build, split="the file's train/val/test",
))
