"""`chexpert`: 14 chest X-ray findings from CheXpert's `train.csv`, with the study's split and label rules.

Split (`split=study`, the default): the study sorts `train.csv` by Path with pandas, keeps the original
row numbers as the index, and slices by label: `.loc[:cut]` (cut = int(0.2 N) + 15) is validation+test,
`.loc[cut:]` is train, and the held-out frame is cut the same way at `int(len / 2)` into validation and
test. Label slices are inclusive, so one boundary row sits in both train and val+test and one in both
val and test; this module reproduces that exactly, so scores are comparable with the study's.
`split=patient` instead makes a seeded 80/10/10 split that keeps each patient in one split.

Labels (1 positive, 0 negative, -1 uncertain, blank not mentioned): blanks are negative under every
policy; uncertain is 0 (`policy=zeros`, the study's U-Zeros), 1 (`policy=ones`) or NaN (`policy=ignore`:
unknown, to be masked by losses and metrics). A row with every label 0 gets No Finding = 1, as in the
study. All 14 labels are kept and scored, frontal and lateral views alike.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Task, as_int, choice, make_splits, metadata_columns, read_table, require_root
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import STUDY_SEED, grouped_split

LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
METADATA = ("Sex", "Age", "Frontal/Lateral")  # per-image columns of train.csv kept for subgroup reports
POLICIES = ("zeros", "ones", "ignore")
SPLITS = ("study", "patient")
LAYOUT = ("the CheXpert-v1.0-small (or CheXpert-v1.0) folder: train.csv (Path, 14 labels) and train/patient*/study*/*.jpg; "
          "CSV paths start with that folder's name")
HOLDOUT = 0.2
CUT_EXTRA = 15  # the study's "+15 ... to make a better patient split"
PATIENT_FRACTIONS = (0.8, 0.1, 0.1)
TASK = Task("multilabel", LABELS, "mean_roc_auc")  # declared at import: a bad metric fails here


def find_root(root: Path) -> Path:
    """The folder holding train.csv: `root` itself, or the one CheXpert-v1.0* folder inside it."""
    if (root / "train.csv").is_file():
        return root
    inner = [d for d in sorted(root.glob("CheXpert-v1.0*")) if (d / "train.csv").is_file()]
    if len(inner) == 1:
        return inner[0]
    raise MedfmError(f"{root / 'train.csv'} does not exist; dataset 'chexpert' expects {LAYOUT}")


def image_path(root: Path, csv_path: str) -> Path:
    """CSV paths are relative to the release folder's parent; drop their first part (the folder's name)."""
    parts = PurePosixPath(csv_path).parts
    return root.joinpath(*parts) if parts[0] in ("train", "valid") else root.joinpath(*parts[1:])


def apply_policy(raw: np.ndarray, policy: str) -> np.ndarray:
    """Raw 1/0/-1/NaN labels -> float32 labels under `policy`, then No Finding = 1 on all-zero rows."""
    uncertain = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[policy]
    labels = np.where(np.isnan(raw), 0.0, raw)
    labels = np.where(labels == -1, uncertain, labels).astype(np.float32)
    labels[(labels == 0).all(axis=1), LABELS.index("No Finding")] = 1.0
    return labels


def study_split(paths: pd.Series) -> dict[str, np.ndarray]:
    """Row numbers per split by the study's pandas procedure (sorted by Path, label-based inclusive slices)."""
    ordered = paths.reset_index(drop=True).sort_values()
    cut = int(len(ordered) * HOLDOUT) + CUT_EXTRA
    try:
        held = ordered.loc[:cut]
        half = int(len(held) / 2)
        parts = {"train": ordered.loc[cut:], "val": held.loc[:half], "test": held.loc[half:]}
    except KeyError:
        raise MedfmError(f"the study's CheXpert cut (row {cut}) falls outside this {len(ordered)}-row train.csv; "
                         "use --opt split=patient for a small or edited CSV") from None
    return {name: part.index.to_numpy(np.int64) for name, part in parts.items()}


def patient_of(csv_path: str) -> str:
    match = re.search(r"patient\d+", csv_path)
    if match is None:
        raise MedfmError(f"cannot find a patient id (patientNNNNN) in Path '{csv_path}'; use --opt split=study")
    return match.group(0)


def build(root: Path | None, *, policy: str = "zeros", split: str = "study", split_seed: int = STUDY_SEED) -> DatasetSource:
    policy, split = choice(policy, "policy", POLICIES), choice(split, "split", SPLITS)
    split_seed = as_int(split_seed, "split_seed")
    root = find_root(require_root(root, "chexpert", LAYOUT))
    table = read_table(root / "train.csv", ["Path", *LABELS], dtype={"Path": str})
    raw = table[list(LABELS)].to_numpy(np.float64)
    odd = ~(np.isnan(raw) | np.isin(raw, (1.0, 0.0, -1.0)))
    if odd.any():
        column = LABELS[int(np.argwhere(odd)[0, 1])]
        raise MedfmError(f"{root / 'train.csv'}: column '{column}' holds values other than 1, 0, -1 or blank")
    ids = table["Path"].tolist()
    if split == "study":
        parts, options = study_split(table["Path"]), {"policy": policy, "split": split}
    else:
        parts = grouped_split([patient_of(p) for p in ids], PATIENT_FRACTIONS, split_seed)
        options = {"policy": policy, "split": split, "split_seed": split_seed}
    return DatasetSource(
        name="chexpert",
        task=TASK,
        splits=make_splits(parts, ids, apply_policy(raw, policy), [image_path(root, p) for p in ids],
                           metadata_columns(table, METADATA)),
        grayscale=True,
        options=options,
        study_norm=((0.503,), (0.292,)),
    )


register(DatasetEntry(
    name="chexpert", description="CheXpert chest X-rays, 14 findings (train.csv only, as the study)",
    task="multilabel, 14 labels; mean ROC-AUC over all 14", layout=LAYOUT, build=build,
    split="study: sorted by Path, first int(0.2N)+15 rows halved into val/test; --opt split=patient for patient-grouped "
          "80/10/10; --opt policy=zeros|ones|ignore",
    classes=LABELS,
))
