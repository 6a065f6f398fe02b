"""Mammography: `ddsm` (the MIT-CSAIL DDSM release the study used) and `cbis-ddsm` (TCIA's curated subset).

`ddsm`: the release's list files name every image; the label is the file name's prefix (`normal_`,
`benign_`, `cancer_`). The study merges benign and cancer into one positive class (normal vs abnormal,
scored by ROC-AUC); `--opt classes=3` keeps the three classes. Splits are the release's fixed lists.

`cbis-ddsm` has no normal mammograms, so its task is benign vs malignant, per full mammogram: an image
is malignant when any abnormality drawn on it is MALIGNANT (BENIGN_WITHOUT_CALLBACK counts as benign).
The official test CSVs are the test split; validation is 10% of the training patients, seeded.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from common.errors import MedfmError
from extract.datasets.base import DatasetSource, Split, Task, as_int, choice, make_splits, read_table, require_file, require_root
from extract.datasets.decode import read_dicom  # the one DICOM reader (LUTs, colour, refusals): docs/images.md
from extract.datasets.registry import DatasetEntry, register
from extract.datasets.splits import STUDY_SEED, grouped_holdout

# --- ddsm (MIT-CSAIL release)
PREFIX_LABEL = {"normal": 0, "benign": 1, "cancer": 2}
# Tasks are declared at import, so a bad metric name fails here. The study merges benign and cancer (2 classes).
DDSM_TASK = Task("binary", ("normal", "abnormal"), "roc_auc")
DDSM_TASK_3 = Task("multiclass", ("normal", "benign", "cancer"), "roc_auc")
LIST_DIR, IMAGE_DIR = "ddsm_raw_image_lists", "ddsm_raw"
DDSM_LAYOUT = f"{IMAGE_DIR}/<image> and {LIST_DIR}/{{train,val,test}}.txt (one image path per line, named normal_*, benign_*, cancer_*)"


def read_list(path: Path) -> list[str]:
    lines = [line.strip() for line in require_file(path, "ddsm", DDSM_LAYOUT).read_text().splitlines()]
    return [line for line in lines if line]


def label_of(line: str, list_file: Path) -> int:
    prefix = PurePosixPath(line).name.split("_")[0]
    if prefix not in PREFIX_LABEL:
        raise MedfmError(f"{list_file}: '{line}' does not start with normal_, benign_ or cancer_, so it has no label")
    return PREFIX_LABEL[prefix]


def build_ddsm(root: Path | None, *, classes: int = 2) -> DatasetSource:
    classes = int(choice(classes, "classes", ("2", "3")))
    root = require_root(root, "ddsm", DDSM_LAYOUT)
    splits = {}
    for name in ("train", "val", "test"):
        list_file = root / LIST_DIR / f"{name}.txt"
        ids = read_list(list_file)
        labels = np.array([label_of(i, list_file) for i in ids], dtype=np.int64)
        splits[name] = Split(ids, np.minimum(labels, classes - 1), [root / IMAGE_DIR / i for i in ids])
    task = DDSM_TASK if classes == 2 else DDSM_TASK_3
    return DatasetSource("ddsm", task, splits, grayscale=True, options={"classes": classes}, study_norm=((0.286,), (0.267,)))


# --- cbis-ddsm (TCIA)
CBIS_CSV = "{kind}_case_description_{part}_set.csv"
CBIS_COLUMNS = ("patient_id", "pathology", "image file path")
PATHOLOGY = {"BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0, "MALIGNANT": 1}
CBIS_LAYOUT = ("{mass,calc}_case_description_{train,test}_set.csv and the DICOM download (folders such as "
               "Mass-Training_P_00001_LEFT_CC/.../*.dcm, directly or under CBIS-DDSM/)")
VAL_FRACTION = 0.1
CBIS_TASK = Task("binary", ("benign", "malignant"), "roc_auc")


def locate_dicom(bases: list[Path], csv_path: str) -> Path:
    """The CSV's path if it exists; else the DICOM inside the image's folder (TCIA renames the files).

    A path that cannot be found is returned as written, so extraction names it as missing.
    """
    rel = PurePosixPath(csv_path.strip())
    for base in bases:
        if (base / rel).is_file():
            return base / rel
    for base in bases:
        found = sorted((base / rel.parts[0]).rglob("*.dcm"))
        if found:
            return found[0]
    return bases[0] / rel


def read_cbis_tables(root: Path, kinds: tuple[str, ...], part: str) -> pd.DataFrame:
    paths = [root / CBIS_CSV.format(kind=k, part=part) for k in kinds]
    for path in paths:
        if not path.is_file():
            raise MedfmError(f"{path} does not exist; dataset 'cbis-ddsm' expects {CBIS_LAYOUT} "
                             "(--opt abnormality=mass or calc reads one kind only)")
    tables = [read_table(path, CBIS_COLUMNS) for path in paths]
    table = pd.concat(tables, ignore_index=True)
    odd = sorted(set(table["pathology"]) - set(PATHOLOGY))
    if odd:
        raise MedfmError(f"{root}: pathology values {', '.join(map(str, odd))} are not {', '.join(PATHOLOGY)}")
    table["image_id"] = table["image file path"].str.strip().str.split("/").str[0]
    table["malignant"] = table["pathology"].map(PATHOLOGY)
    images = table.groupby("image_id", sort=True).agg(patient=("patient_id", "first"), label=("malignant", "max"),
                                                       path=("image file path", "first"))
    return images.reset_index()


def build_cbis(root: Path | None, *, abnormality: str = "both", split_seed: int = STUDY_SEED) -> DatasetSource:
    abnormality = choice(abnormality, "abnormality", ("both", "mass", "calc"))
    split_seed = as_int(split_seed, "split_seed")
    kinds = ("mass", "calc") if abnormality == "both" else (abnormality,)
    root = require_root(root, "cbis-ddsm", CBIS_LAYOUT)
    bases = [root, root / "CBIS-DDSM"]
    train, test = read_cbis_tables(root, kinds, "train"), read_cbis_tables(root, kinds, "test")
    kept, held = grouped_holdout(train["patient"].to_numpy(), VAL_FRACTION, split_seed)
    table = pd.concat([train, test], ignore_index=True)
    parts = {"train": kept, "val": held, "test": np.arange(len(train), len(table))}
    ids = table["image_id"].tolist()
    images = [locate_dicom(bases, p) for p in table["path"]]
    return DatasetSource(
        name="cbis-ddsm",
        task=CBIS_TASK,
        splits=make_splits(parts, ids, table["label"].to_numpy(np.int64), images),
        grayscale=True,
        load_image=read_dicom,
        options={"abnormality": abnormality, "split_seed": split_seed},
    )


register(DatasetEntry(
    name="ddsm", description="DDSM mammograms, MIT-CSAIL release (the study's)",
    task="binary normal vs benign+cancer (--opt classes=3: 3 classes); ROC-AUC", layout=DDSM_LAYOUT, build=build_ddsm,
    split="study: the release's fixed train/val/test lists", classes=DDSM_TASK.class_names,
))
register(DatasetEntry(
    name="cbis-ddsm", description="CBIS-DDSM (TCIA) full mammograms from DICOM; no normals",
    task="binary benign vs malignant (any malignant abnormality); ROC-AUC", layout=CBIS_LAYOUT, build=build_cbis,
    split="official test CSVs; val = 10% of training patients (seeded); --opt abnormality=both|mass|calc",
    classes=CBIS_TASK.class_names,
))
