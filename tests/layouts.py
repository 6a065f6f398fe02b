"""Small fixture trees in each dataset's released layout (tiny images; DICOM through pydicom), as the dataset
builders read them: `write_<name>(root)` per dataset, `image` for one file. Used by the dataset, extraction, decode,
subgroup, transfer and finetune tests; the tests of each layout are tests/extract/test_datasets_layouts.py and
tests/extract/test_datasets_transfer.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from extract.datasets.chexpert import LABELS


def image(path: Path, value: int = 100, mode: str = "RGB", size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)
    return path


def write_aptos(root: Path, n: int = 20) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{i:04x}beef{i}" for i in range(n)]
    pd.DataFrame({"id_code": ids, "diagnosis": [i % 5 for i in range(n)]}).to_csv(root / "train.csv", index=False)
    for i, name in enumerate(ids):
        image(root / "train_images" / f"{name}.png", value=10 * i)
    return ids


def write_isic(root: Path, image_dir: str = "ISIC_2019_Training_Input", n: int = 16) -> list[str]:
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    onehot = np.zeros((n, 9))
    onehot[np.arange(n), np.arange(n) % 8] = 1.0
    table = pd.DataFrame(onehot, columns=classes)
    ids = [f"ISIC_{i:07d}" for i in range(n)]
    table.insert(0, "image", ids)
    table.to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    for name in ids:
        image(root / image_dir / f"{name}.jpg")
    return ids


def chexpert_rows(n_patients: int = 10) -> list[str]:
    """Release order: within a patient study2 comes before study1, as in CheXpert's train.csv."""
    return [f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/view1_frontal.jpg"
            for p in range(1, n_patients + 1) for s in (2, 1, 3, 4)]


def write_chexpert(parent: Path, labels: np.ndarray | None = None, n_patients: int = 10) -> Path:
    root = parent / "CheXpert-v1.0-small"
    paths = chexpert_rows(n_patients)
    if labels is None:
        labels = np.zeros((len(paths), 14))
        labels[np.arange(len(paths)), 1 + np.arange(len(paths)) % 13] = 1
    table = pd.DataFrame(labels, columns=list(LABELS))
    for col, value in reversed(list({"Path": paths, "Sex": "Female", "Age": 60, "Frontal/Lateral": "Frontal", "AP/PA": "AP"}.items())):
        table.insert(0, col, value)
    root.mkdir(parents=True)
    table.to_csv(root / "train.csv", index=False)
    for path in paths:
        image(parent / path, mode="L")
    return root


def write_ddsm(root: Path) -> dict[str, list[str]]:
    lists = {"train": ["normal_01.png", "benign_02.png", "cancer_03.png", "normal_04.png", "cancer_05.png", "benign_06.png"],
             "val": ["normal_07.png", "cancer_08.png"], "test": ["benign_09.png", "normal_10.png", "cancer_11.png"]}
    (root / "ddsm_raw_image_lists").mkdir(parents=True)
    for split, names in lists.items():
        (root / "ddsm_raw_image_lists" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            image(root / "ddsm_raw" / name, value=50, mode="L", size=12)
    return lists


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


CBIS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id", "abnormality type",
                "mass shape", "mass margins", "assessment", "pathology", "subtlety", "image file path",
                "cropped image file path", "ROI mask file path"]


def write_cbis(root: Path, n_train_patients: int = 10) -> dict[str, int]:
    """Mass CSVs and DICOMs in TCIA's download layout (the CSV's file names differ from the files on disk)."""
    root.mkdir(parents=True, exist_ok=True)
    labels: dict[str, int] = {}
    for part, folder, n in (("train", "Mass-Training", n_train_patients), ("test", "Mass-Test", 3)):
        rows = []
        for p in range(n):
            patient = f"P_{p + (0 if part == 'train' else 500):05d}"
            image_id = f"{folder}_{patient}_LEFT_CC"
            pathologies = ["BENIGN", "MALIGNANT"] if p % 3 == 0 else ["BENIGN_WITHOUT_CALLBACK" if p % 3 == 1 else "MALIGNANT"]
            for k, pathology in enumerate(pathologies, start=1):
                rows.append([patient, 2, "LEFT", "CC", k, "mass", "OVAL", "CIRCUMSCRIBED", 3, pathology, 4,
                             f"{image_id}/1.3.6.1.4.1.9590.100.1.2.{p}1/1.3.6.1.4.1.9590.100.1.2.{p}2/000000.dcm",
                             f"{image_id}_{k}/1.3.6/1.3.7/000000.dcm", f"{image_id}_{k}/1.3.6/1.3.7/000001.dcm\n"])
            labels[image_id] = int("MALIGNANT" in pathologies)
            pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * (p + 1) * 40)
            write_dicom(root / "CBIS-DDSM" / image_id / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm", pixels)
        pd.DataFrame(rows, columns=CBIS_COLUMNS).to_csv(root / f"mass_case_description_{part}_set.csv", index=False)
    return labels


def write_medmnist(path: Path, label_width: int = 1, rgb: bool = False) -> Path:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        arrays[f"{split}_images"] = rng.integers(0, 255, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (n, label_width)) if label_width > 1
                                     else (np.arange(n) % 3).reshape(n, 1)).astype(np.uint8)
    np.savez(path, **arrays)
    return path


# --- the transfer datasets (docs/transfer.md)


HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def write_ham10000(root: Path, lesions_per_class: int = 10) -> pd.DataFrame:
    """HAM10000_metadata.csv and the two image folders; every third lesion photographed twice."""
    rows = []
    for c, dx in enumerate(HAM_CLASSES):
        for k in range(lesions_per_class):
            lesion = f"HAM_{c * 100 + k:07d}"
            for shot in range(2 if k % 3 == 0 else 1):
                rows.append([lesion, f"ISIC_{24306 + len(rows):07d}", dx, "histo", 40.0 + k, ["male", "female"][shot], "back"])
    table = pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "HAM10000_metadata.csv", index=False)
    for n, name in enumerate(table["image_id"]):
        image(root / f"HAM10000_images_part_{1 + n % 2}" / f"{name}.jpg", value=2 * n)
    return table


def write_idrid_labels(part: Path, grades: dict[str, list[int]]) -> None:
    """The two ground-truth CSVs as released: a trailing space in the third header, blank trailing columns and rows."""
    (part / "2. Groundtruths").mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "a. IDRiD_Disease Grading_Training Labels.csv"), ("test", "b. IDRiD_Disease Grading_Testing Labels.csv")):
        lines = ["Image name,Retinopathy grade,Risk of macular edema ,,,"]
        lines += [f"IDRiD_{k + 1:03d},{g},{g % 3},,," for k, g in enumerate(grades[split])]
        (part / "2. Groundtruths" / name).write_text("\n".join([*lines, ",,,,,", ""]))


def write_idrid(parent: Path, per_grade: dict[str, int] | None = None) -> Path:
    """IDRiD's "B. Disease Grading" part: images numbered from IDRiD_001 in both sets, the two label CSVs."""
    per_grade = per_grade or {"train": 10, "test": 2}
    part = parent / "B. Disease Grading"
    grades = {s: [g for _ in range(n) for g in range(5)] for s, n in per_grade.items()}
    write_idrid_labels(part, grades)
    for split, folder in (("train", "a. Training Set"), ("test", "b. Testing Set")):
        for k in range(len(grades[split])):
            image(part / "1. Original Images" / folder / f"IDRiD_{k + 1:03d}.jpg", value=5 * k)
    return part


def write_messidor2(root: Path, exams: int = 30) -> pd.DataFrame:
    """ADCIS's IMAGES/ and messidor-2.csv (the two eyes of each examination), Kaggle's adjudicated messidor_data.csv.

    Half the examinations are Messidor-Original (.png), half Messidor-Extension (.JPG on disk, .jpg in the CSV);
    the first examination's right eye is ungradable.
    """
    rows, pairs = [], []
    for e in range(exams):
        names = ([f"20051020_{43808 + 2 * e}_0100_PP.png", f"20051020_{43809 + 2 * e}_0100_PP.png"] if e % 2 else
                 [f"IM{2385 + 2 * e:06d}.JPG", f"IM{2386 + 2 * e:06d}.JPG"])
        pairs.append(";".join(names))
        for eye, name in enumerate(names):
            image(root / "IMAGES" / name, value=3 * len(rows))
            gradable = not (e == 0 and eye == 1)
            rows.append([name.replace(".JPG", ".jpg"), (e + eye) % 5 if gradable else None, e % 2 if gradable else None,
                         int(gradable), f"exam{e}"])
    (root / "messidor-2.csv").write_text("\n".join(["left;right", *pairs, ""]))
    table = pd.DataFrame(rows, columns=["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable", "exam"])
    table.drop(columns="exam").to_csv(root / "messidor_data.csv", index=False)
    return table


NIH_ROWS = [  # (image, findings, patient, split)
    ("00000001_000.png", "Cardiomegaly", 1, "train_val"), ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "train_val"),
    ("00000002_000.png", "No Finding", 2, "train_val"), ("00000003_000.png", "Hernia", 3, "test"),
    ("00000003_001.png", "Effusion|Mass|Nodule", 3, "test"), ("00000004_000.png", "Mass|Nodule", 4, "train_val"),
    ("00000005_000.png", "No Finding", 5, "train_val"), ("00000005_001.png", "Infiltration", 5, "train_val"),
    ("00000006_000.png", "Atelectasis|Pneumothorax", 6, "train_val"), ("00000007_000.png", "Consolidation|Edema", 7, "test"),
    ("00000008_000.png", "Pneumonia", 8, "train_val"), ("00000009_000.png", "Fibrosis|Pleural_Thickening", 9, "train_val"),
    ("00000010_000.png", "No Finding", 10, "train_val"), ("00000011_000.png", "Effusion", 11, "train_val"),
    ("00000012_000.png", "Atelectasis", 12, "train_val"), ("00000013_000.png", "No Finding", 13, "test"),
]


def write_chestxray14(root: Path) -> pd.DataFrame:
    """Data_Entry_2017.csv (the release's columns), the two split lists, and the PNGs spread over images_001, images_002."""
    table = pd.DataFrame({"Image Index": [r[0] for r in NIH_ROWS], "Finding Labels": [r[1] for r in NIH_ROWS],
                          "Follow-up #": [int(r[0][9:12]) for r in NIH_ROWS], "Patient ID": [r[2] for r in NIH_ROWS],
                          "Patient Age": 58, "Patient Gender": ["M", "F"] * 8, "View Position": "PA",
                          "OriginalImage[Width": 2682, "Height]": 2749, "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143})
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "Data_Entry_2017.csv", index=False)
    for split in ("train_val", "test"):
        (root / f"{split}_list.txt").write_text("".join(f"{r[0]}\n" for r in NIH_ROWS if r[3] == split))
    for k, row in enumerate(NIH_ROWS):
        image(root / f"images_00{1 + k // 8}" / "images" / row[0], mode="L", value=10 * k)
    return table
