"""Subgroups: per-sample metadata from the release, through the cache, to `probe report --by`."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from cache.layout import open_cache
from cache.store import CacheReader, verify
from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract
from ledger.predictions import load_predictions
from ledger.store import Ledger
from probe.cli import main
from probe.config import TrainConfig
from probe.run import run_probe
from report.subgroups import group_values
from scoring.metrics import compute_metrics
from tests.layouts import image, write_chexpert, write_isic
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT, run_main

SEX = ["F", "F", "M", "M", ""]  # a blank: the group `unknown`


def write_csv_with_metadata(root: Path, n: int = 40) -> pd.DataFrame:
    table = pd.DataFrame({"path": [f"img/{i}.png" for i in range(n)], "label": ["yes" if i % 2 else "no" for i in range(n)],
                          "sex": [SEX[i % 5] for i in range(n)], "age": [20 + 3 * i for i in range(n)],
                          "fold": ["train"] * (n - 20) + ["val"] * 5 + ["test"] * 15})
    root.mkdir(parents=True, exist_ok=True)
    table.to_csv(root / "labels.csv", index=False)
    for i, path in enumerate(table["path"]):
        image(root / path, value=200 if i % 2 else 20)
    return table


def test_datasets_carry_the_releases_per_sample_metadata(tmp_path: Path) -> None:
    chexpert = get_dataset("chexpert", write_chexpert(tmp_path / "cx"), split="patient")
    assert set(chexpert.splits["train"].metadata) == {"Sex", "Age", "Frontal/Lateral"}
    assert set(chexpert.splits["test"].metadata["Sex"]) == {"Female"} and set(chexpert.splits["test"].metadata["Age"]) == {"60"}
    root = tmp_path / "isic"
    root.mkdir()
    ids = write_isic(root)
    assert get_dataset("isic2019", root).splits["train"].metadata == {}  # the metadata file is optional
    pd.DataFrame({"image": ids[1:], "age_approx": [55.0] * (len(ids) - 1), "anatom_site_general": "head/neck",
                  "lesion_id": "x", "sex": "male"}).to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False)
    source = get_dataset("isic2019", root)
    rows = {i: (s, k) for s in source.splits.values() for k, i in enumerate(s.ids)}
    split, k = rows[ids[0]]  # not in the metadata file: blank
    assert {c: v[k] for c, v in split.metadata.items()} == {"age_approx": "", "anatom_site_general": "", "sex": ""}
    split, k = rows[ids[1]]
    assert {c: v[k] for c, v in split.metadata.items()} == {"age_approx": "55", "anatom_site_general": "head/neck", "sex": "male"}
    table = write_csv_with_metadata(tmp_path / "own")
    csv = get_dataset("csv", tmp_path / "own", split_column="fold")
    assert csv.splits["test"].metadata == {"sex": [SEX[i % 5] for i in range(25, 40)], "age": [str(20 + 3 * i) for i in range(25, 40)]}
    assert csv.splits["test"].ids == table["path"].tolist()[25:]


def test_ages_bin_into_decades_and_blanks_are_unknown() -> None:
    assert group_values("age_approx", np.array(["55", "60", "", "69.0"], dtype=object)).tolist() == ["50-59", "60-69", "unknown", "60-69"]
    assert group_values("Sex", np.array(["F", ""], dtype=object)).tolist() == ["F", "unknown"]


@pytest.fixture
def run_with_metadata(isolated_outputs: Path):
    write_csv_with_metadata(isolated_outputs.parent / "data")
    result = extract(ExtractConfig(backbone="deit", dataset="csv", root=isolated_outputs.parent / "data", weights="random",
                                   out=isolated_outputs / "features", batch_size=8, image_size=TINY_SIZE, workers=0,
                                   overrides=TINY_VIT, tokens=False, device="cpu", dataset_options={"split_column": "fold"}), QUIET)
    with open_cache(result.path, "deit", "csv") as reader:
        record = run_probe(reader, TrainConfig(epochs=3, batch_size=8), device="cpu").record
    return result.path, record


def test_metadata_is_stored_per_split_with_checksums_and_verified(run_with_metadata) -> None:
    path, _ = run_with_metadata
    with CacheReader(path) as reader:
        assert reader.metadata("test")["sex"].tolist() == [SEX[i % 5] for i in range(25, 40)]
        assert reader.feature_names("test") == ["pooled"]  # the metadata group is no feature
    assert verify(path) == []
    with h5py.File(path, "r+") as file:
        file["test/meta/sex"][0] = "M"
    assert verify(path) == ["test: metadata column sex differs from its checksum"]


def test_probe_report_by_sex_scores_each_group_from_the_stored_predictions(run_with_metadata, monkeypatch, isolated_outputs) -> None:
    path, record = run_with_metadata
    code, out, err = run_main(main, ["report", "--by", "sex", "--min-group", "3"], monkeypatch)
    assert code == 0, err
    assert "test scores by sex" in out
    table = pd.read_csv(isolated_outputs / "reports" / "report_by_sex.csv", keep_default_na=False)
    assert table["group"].tolist() == ["F", "M", "unknown"] and table["n"].tolist() == [6, 6, 3]
    stored = load_predictions(record.run_dir, "test")
    with CacheReader(path) as reader:
        sex = dict(zip(reader.ids("test"), reader.metadata("test")["sex"], strict=True))
        task = reader.task
    expected = {}
    for group, value in (("F", "F"), ("M", "M"), ("unknown", "")):
        mask = np.array([sex[i] == value for i in stored.ids])
        expected[group] = compute_metrics(task, stored.labels[mask], stored.logits[mask], only="roc_auc")["roc_auc"]
    assert table["score"].tolist() == pytest.approx([expected[g] for g in ("F", "M", "unknown")], abs=1e-4)
    finite = {g: v for g, v in expected.items() if np.isfinite(v)}
    assert table["worst group"].iloc[0] == min(finite, key=finite.get)
    assert table["gap"].iloc[0] == pytest.approx(max(finite.values()) - min(finite.values()), abs=1e-4)
    assert len(Ledger().rows()) == 1


def test_report_by_a_column_the_dataset_lacks_is_one_line_and_exit_2(run_with_metadata, monkeypatch) -> None:
    code, _, err = run_main(main, ["report", "--by", "ethnicity"], monkeypatch)
    assert code == 2
    assert "--by ethnicity: dataset" in err and "its columns: age, sex" in err and len(err.strip().splitlines()) == 1


def test_groups_get_intervals_and_a_small_group_is_never_the_worst(run_with_metadata, monkeypatch, isolated_outputs) -> None:
    code, out, err = run_main(main, ["report", "--by", "sex", "--boot", "200", "--ci", "90"], monkeypatch)
    assert code == 0, err
    table = pd.read_csv(isolated_outputs / "reports" / "report-ci90-boot200_by_sex.csv", keep_default_na=False)  # the report's name
    assert table["small"].tolist() == [True, True, True]  # 6, 6 and 3 samples, under the default 30
    assert (table["worst group"] == "").all() and "smaller groups marked 'small'" in " ".join(out.split())
    finite = table[table["score"] != ""]
    assert (finite["ci low"].astype(float) <= finite["score"].astype(float)).all()
    assert (finite["score"].astype(float) <= finite["ci high"].astype(float)).all()
    code, _, err = run_main(main, ["report", "--by", "sex", "--min-group", "6"], monkeypatch)
    table = pd.read_csv(isolated_outputs / "reports" / "report_by_sex.csv", keep_default_na=False)
    assert code == 0 and table["small"].tolist() == [False, False, True] and table["worst group"].iloc[0] in ("F", "M")
