"""Extraction over the released layouts with a tiny DeiT: cached rows and labels, manifests, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import CacheReader
from common.errors import MedfmError
from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract
from tests.extract.extractions import error_line, invoke
from tests.layouts import image, write_aptos, write_cbis, write_chexpert, write_ddsm, write_medmnist
from tests.tiny import QUIET, TINY_VIT_1


def run(dataset: str, root: Path, out: Path, **kw) -> Path:
    cfg = ExtractConfig(backbone="deit", dataset=dataset, root=root, weights="random", out=out, batch_size=8,
                        image_size=32, workers=0, overrides=TINY_VIT_1, **kw)
    return extract(cfg, QUIET).path


def cached(path: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    with CacheReader(path) as r:
        return {s: (r.ids(s).tolist(), r.labels(s), r.features(s)) for s in r.splits}


def test_aptos_cache_holds_the_study_split_ids_labels_and_task(tmp_path: Path) -> None:
    write_aptos(tmp_path / "aptos")
    path = run("aptos2019", tmp_path / "aptos", tmp_path / "out")
    source = get_dataset("aptos2019", tmp_path / "aptos")
    got = cached(path)
    for split, (ids, labels, pooled) in got.items():
        assert ids == source.splits[split].ids and labels.tolist() == source.splits[split].labels.tolist()
        assert pooled.shape == (len(ids), 32) and np.isfinite(pooled).all()
    assert json.loads(path.with_suffix(".splits.json").read_text()) == source.manifest()
    with CacheReader(path) as r:
        assert r.task.primary_metric == "quadratic_kappa" and r.meta.dataset.options == {"split_seed": 42}


def test_chexpert_ignore_policy_caches_nan_labels_and_grayscale_runs_one_channel(tmp_path: Path) -> None:
    labels = np.zeros((40, 14))
    labels[:, 5] = 1
    labels[0, 7] = -1
    root = write_chexpert(tmp_path / "data", labels)
    path = run("chexpert", root, tmp_path / "out", in_chans=1, dataset_options={"policy": "ignore"})
    got = cached(path)
    assert sum(len(v[0]) for v in got.values()) == 42  # two boundary rows sit in two splits, as in the study
    val = got["val"][1]  # val[1] is train.csv's first row (study2 sorts after study1)
    assert val.shape == (14, 14) and np.isnan(val[1, 7]) and np.isnan(val).sum() == 1
    with CacheReader(path) as r:
        assert r.meta.transform["channels"] == 1 and r.task.kind == "multilabel"


def test_ddsm_cbis_and_medmnist_extract_every_listed_image(tmp_path: Path) -> None:
    lists = write_ddsm(tmp_path / "ddsm")
    got = cached(run("ddsm", tmp_path / "ddsm", tmp_path / "out"))
    assert {s: v[0] for s, v in got.items()} == lists and got["test"][1].tolist() == [1, 0, 1]
    labels = write_cbis(tmp_path / "cbis", n_train_patients=4)
    got = cached(run("cbis-ddsm", tmp_path / "cbis", tmp_path / "out", dataset_options={"abnormality": "mass"}))
    assert all(v[1].tolist() == [labels[i] for i in v[0]] for v in got.values()) and len(got["test"][0]) == 3
    got = cached(run("medmnist", write_medmnist(tmp_path / "m.npz"), tmp_path / "out"))
    assert [len(v[0]) for v in got.values()] == [12, 4, 5] and got["val"][1].tolist() == [0, 1, 2, 0]


def write_folder(root: Path) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            image(root / cls / f"{i}.png", value=20 * i)


def test_manifest_reproduces_a_saved_split_under_other_split_options(tmp_path: Path) -> None:
    write_folder(tmp_path / "data")
    first = run("imagefolder", tmp_path / "data", tmp_path / "out", dataset_options={"split_seed": 1})
    manifest = first.with_suffix(".splits.json")
    again = run("imagefolder", tmp_path / "data", tmp_path / "out", dataset_options={"split_seed": 2}, manifest=manifest)
    other = run("imagefolder", tmp_path / "data", tmp_path / "out", dataset_options={"split_seed": 2})
    ids = {s: v[0] for s, v in cached(first).items()}
    assert {s: v[0] for s, v in cached(again).items()} == ids != {s: v[0] for s, v in cached(other).items()}


def test_manifest_naming_ids_not_in_the_dataset_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path / "data")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"train": ["a/0.png", "a/99.png"], "val": ["b/1.png"], "test": ["b/2.png"]}))
    with pytest.raises(MedfmError, match="1 id\\(s\\) that dataset 'imagefolder' does not hold .* a/99.png"):
        run("imagefolder", tmp_path / "data", tmp_path / "out", manifest=manifest)


def test_corrupt_image_stops_naming_the_file_and_skip_bad_records_it(tmp_path: Path) -> None:
    ids = write_aptos(tmp_path / "aptos")
    (tmp_path / "aptos" / "train_images" / f"{ids[4]}.png").write_bytes(b"not a png at all")
    (tmp_path / "aptos" / "train_images" / f"{ids[9]}.png").unlink()
    with pytest.raises(MedfmError, match=f"cannot read image .*{ids[4]}.png: UnidentifiedImageError.*--skip-bad"):
        run("aptos2019", tmp_path / "aptos", tmp_path / "out")
    path = run("aptos2019", tmp_path / "aptos", tmp_path / "out", skip_bad=True)
    with CacheReader(path) as r:
        assert sorted(r.meta.skipped) == sorted([ids[4], ids[9]])
        kept = [i for s in r.splits for i in r.ids(s)]
    assert len(kept) == 18 and ids[4] not in kept and ids[9] not in kept
    listed = [line.split("\t") for line in path.with_name(path.name.split(".")[0] + ".skipped.tsv").read_text().splitlines()]
    assert listed[0] == ["id", "reason"] and sorted(i for i, _ in listed[1:]) == sorted([ids[4], ids[9]])  # every one, not a batch's first
    reasons = dict(listed[1:])
    assert "UnidentifiedImageError" in reasons[ids[4]] and "file not found" in reasons[ids[9]]


def test_extraction_into_a_log_file_says_its_progress_while_it_runs(tmp_path: Path, monkeypatch) -> None:
    """Not a terminal (a log file, a SLURM job): plain lines with images, img/s and the time left, every 30 s of
    the run (the clock is stepped 31 s a call here), before the cache is complete."""
    import io
    import itertools

    from rich.console import Console

    from common.progress import Pace

    ticks = itertools.count(0, 31)
    monkeypatch.setattr(Pace, "clock", staticmethod(lambda: float(next(ticks))))
    write_folder(tmp_path / "data")
    log = io.StringIO()
    cfg = ExtractConfig(backbone="deit", dataset="imagefolder", root=tmp_path / "data", weights="random", out=tmp_path / "out",
                        batch_size=4, image_size=32, workers=0, overrides=TINY_VIT_1)
    extract(cfg, Console(file=log, width=200))
    lines = log.getvalue().splitlines()
    progress = [i for i, line in enumerate(lines) if "extracting deit / imagefolder: " in line and " img/s, image " in line]
    assert len(progress) >= 2 and "left" in lines[progress[0]]
    assert progress[-1] < next(i for i, line in enumerate(lines) if "cache complete" in line)


def test_missing_image_error_says_file_not_found(tmp_path: Path) -> None:
    lists = write_ddsm(tmp_path / "ddsm")
    (tmp_path / "ddsm" / "ddsm_raw" / lists["val"][1]).unlink()
    with pytest.raises(MedfmError, match=f"cannot read image .*ddsm_raw/{lists['val'][1]}: file not found"):
        run("ddsm", tmp_path / "ddsm", tmp_path / "out")


def test_cli_corrupt_image_is_one_error_line_and_exit_2(tmp_path: Path, monkeypatch) -> None:
    ids = write_aptos(tmp_path / "aptos")
    bad = tmp_path / "aptos" / "train_images" / f"{ids[0]}.png"
    bad.write_bytes(b"\x89PNG broken")
    args = ["run", "--backbone", "tiny-deit", "--weights", "random", "--dataset", "aptos2019", "--root", str(tmp_path / "aptos"),
            "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "out")]
    code, _, err = invoke(args, monkeypatch)
    line = error_line(code, err)
    assert f"cannot read image {bad}" in line and "--skip-bad" in line
    assert not list((tmp_path / "out").rglob("*.h5"))  # a partial file may stay, to resume; never a complete-looking one


def test_cli_csv_with_a_wrong_column_is_one_error_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    pd.DataFrame({"path": ["a.png"], "diagnosis": ["x"]}).to_csv(tmp_path / "labels.csv", index=False)
    code, _, err = invoke(["run", "--backbone", "deit", "--weights", "random", "--dataset", "csv", "--root", str(tmp_path)], monkeypatch)
    assert "lacks column(s) label; it has path, diagnosis" in error_line(code, err)


def test_cli_datasets_lists_every_dataset_with_metric_and_layout(monkeypatch) -> None:
    code, out, err = invoke(["datasets"], monkeypatch)
    assert code == 0, err
    blocks: dict[str, str] = {}
    for line in out.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = line
        else:
            blocks[name] += "\n" + line
    for name, words in [("aptos2019", "quadratic kappa"), ("isic2019", "macro recall"), ("ddsm", "ROC-AUC"),
                        ("chexpert", "mean ROC-AUC"), ("cbis-ddsm", "benign vs malignant"), ("medmnist", ".npz"),
                        ("imagefolder", "root/<class>/<image>"), ("csv", "labels.csv")]:
        assert words in blocks[name] and "layout " in blocks[name], blocks.get(name)


@pytest.mark.parametrize(("dataset", "in_chans", "mean", "std"), [
    ("aptos2019", 3, [0.415, 0.221, 0.073], [0.275, 0.150, 0.081]),
    ("chexpert", 1, [0.503], [0.292]),
    ("chexpert", 3, [0.503] * 3, [0.292] * 3),  # the gray image fed as RGB: the one value per channel
])
def test_study_inputs_use_the_studys_constants_and_resize_and_enter_the_fingerprint(tmp_path: Path, dataset: str, in_chans: int,
                                                                                    mean: list, std: list) -> None:
    if dataset == "aptos2019":
        write_aptos(root := tmp_path / "aptos")
    else:
        root = write_chexpert(tmp_path / "data")
    study = run(dataset, root, tmp_path / "out", in_chans=in_chans, norm="study", interpolation="bilinear")
    model = run(dataset, root, tmp_path / "out", in_chans=in_chans)
    assert study != model
    with CacheReader(study) as r, CacheReader(model) as m:
        assert r.meta.transform["mean"] == mean and r.meta.transform["std"] == std
        assert r.meta.settings["norm"] == {"kind": "study"}
        assert (r.meta.transform["interpolation"], m.meta.transform["interpolation"]) == ("bilinear", "bicubic")


def test_study_norm_on_a_dataset_outside_the_study_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MedfmError, match="--norm study: demo is not one of the study's datasets"):
        extract(ExtractConfig(backbone="deit", dataset="demo", weights="random", out=tmp_path, image_size=32, overrides=TINY_VIT_1, norm="study"), QUIET)
    write_aptos(tmp_path / "aptos")
    with pytest.raises(MedfmError, match="3 channels, not 1"):
        run("aptos2019", tmp_path / "aptos", tmp_path / "out", in_chans=1, norm="study")
