"""`probe report --html`: one self-contained page, opened in a real headless browser (Debian's chromium, which .ci/run
installs), with the table, the figures, the ranking and the runs behind every number."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ledger.records import EvaluationRecord
from ledger.store import Ledger
from probe.cli import main
from report.html import render_html
from report.ranking import rank_or_reason
from report.table import build_report, write_report
from tests.conftest import tool
from tests.ledgers import train
from tests.probe.caches import make_cache
from tests.tiny import run_main

BACKBONES = {"deit": 0.4, "sam": 1.0, "dinov2": 2.5}  # how well each backbone's features separate the classes
WINDOW = (1280, 1600)
IMAGE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three backbones on two datasets, trained (a few AdamW epochs) from tiny caches that share their test rows, with stored
    predictions, and `probe eval` scores of the demo runs under a corruption and on the other dataset; the ledger's path."""
    outputs = tmp_path_factory.mktemp("study") / "outputs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDFM_OUTPUT", str(outputs))
        for number, (backbone, separation) in enumerate(BACKBONES.items()):
            for seed, dataset in enumerate(("demo", "other")):
                cache = make_cache(outputs / "features" / backbone / f"{dataset}-{number}{seed}aaaaaaaaaa.h5", backbone=backbone,
                                   dataset=dataset, tokens=None, seed=seed, separation=separation,
                                   settings={"backbone": backbone, "dataset": dataset})
                train(cache, solver="adamw", epochs=2)
        ledger = Ledger()
        runs = ledger.rows()
        other = next(r for r in runs if r.dataset == "other")
        for run in (r for r in runs if r.dataset == "demo"):
            for kind, target, score in (("gaussian_noise", run, 0.8 * run.test_primary), ("", other, 0.5)):
                ledger.add_evaluation(EvaluationRecord(
                    run.id, run.config_key, run.dataset_id, target.dataset, target.dataset_id, target.dataset_label, kind,
                    3 if kind else None, "cache.h5", f"{kind or target.dataset}-fingerprint", run.primary_metric, score, {}, 48))
    return ledger.path


def page(study: Path, tmp_path: Path, monkeypatch, *args: str) -> tuple[Path, str]:
    """`probe report --html` on the study: the page's path and what the command printed."""
    path = tmp_path / "report.html"
    code, out, err = run_main(main, ["report", "--ledger", str(study), "--out", str(tmp_path / "reports"), "--boot", "100",
                                     "--html", str(path), *args], monkeypatch)
    assert code == 0, err
    return path, out


def test_the_page_opens_in_headless_chromium_without_a_console_error_and_shows_table_and_figures(study, tmp_path, monkeypatch):
    chromium = tool("chromium")
    path, _ = page(study, tmp_path, monkeypatch)
    browse = [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    drawn = subprocess.run([*browse, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                            path.as_uri()], capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert not [line for line in drawn.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]  # the page has no script
    with Image.open(shot) as image:
        assert image.size == WINDOW
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # text and a figure on screen, not a blank page
    dom = subprocess.run([*browse, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<table>" in dom and "dinov2 frozen-linear" in dom and "Where every number comes from" in dom
    images = IMAGE.findall(dom)
    assert len(images) == 3 == dom.count("<img")  # gain, scores, critical-difference diagram: all embedded
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as figure:
            assert len(np.unique(np.asarray(figure.convert("L")))) > 2  # not a single colour


def test_the_page_holds_every_section_and_the_runs_behind_every_number(study, tmp_path, monkeypatch):
    path, out = page(study, tmp_path, monkeypatch, "--name", "other=ward <b> & co")
    text = path.read_text()
    assert f"html:{path}" in "".join(out.split())  # among the files printed (wrapped to the terminal)
    assert not re.search(r"<(script|link|iframe)\b|(src|href)=\"(?!data:|#)", text)  # nothing fetched: opens from disk
    assert "ward &lt;b&gt; &amp; co (accuracy)" in text and "<b>" not in text  # labels escaped
    report = build_report(Ledger(study).rows(), names={"other": "ward <b> & co"})
    for key in report.table.index:
        assert re.search(re.escape(report.rows[key].label) + r"</td><td[^>]*>\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\] \(n=1", text)
    assert "then the mean over the 2 dataset(s)" in text and "error bars: 95% bootstrap intervals, paired with the baseline" in text
    for section in ("mean rank [95% interval]", "P(best)", "Pairs", "Relative drop (%) under corruption", "Transfer to other datasets",
                    "adaptive ECE", "Total of the grid"):
        assert section in text, section
    for runs in report.chosen.values():
        for run in runs:
            assert run.run_dir in text and run.config_key in text and run.cache_fingerprint in text
    assert f"probe report --ledger {study} --out {tmp_path / 'reports'} --boot 100 --html {path} --name" in text
    (diagram,) = (tmp_path / "reports").glob("*_ranking_cd.png")  # the report's own file, embedded
    assert base64.b64encode(diagram.read_bytes()).decode() in text


def test_a_report_without_a_ranking_says_why_and_shows_its_subgroups_and_calibration(study, tmp_path):
    report = build_report([r for r in Ledger(study).rows() if r.backbone == "deit"])
    next(iter(report.chosen.values()))[0].test_metrics["ece_calibrated"] = 0.0123  # as `probe run --calibrate` records it
    write_report(report, tmp_path)
    ranking = rank_or_reason(report)
    assert isinstance(ranking, str) and "a ranking needs at least two rows" in ranking
    groups = pd.DataFrame([{"row": "deit frozen-linear", "dataset": "demo", "metric": "accuracy", "column": "sex", "group": group,
                            "n": 24, "score": score, "ci low": score - 0.1, "ci high": score + 0.1, "small": True, "worst group": "",
                            "gap": float("nan")} for group, score in (("F", 0.5), ("M", 0.75))])
    text = render_html(report, ranking=ranking, command="probe report --html r.html", ledger=study, subgroups=(groups, ["a note"]))
    assert "No ranking: a ranking needs at least two rows" in text and "Figure not drawn" not in text
    assert "sex: score [interval] (n) per group" in text and "F 0.5000 [0.4000, 0.6000] (n=24, small)" in text
    assert "<th>ECE after temperature</th>" in text and ">0.0123</td>" in text


@pytest.mark.parametrize("flag", ["--html", "--latex"])
@pytest.mark.parametrize("target, said", [("missing/report.out", "missing does not exist"), (".", "is a folder"),
                                          ("file.txt/report.out", "file.txt is not a folder")])
def test_an_unwritable_target_is_one_line_before_the_report_is_built(study, tmp_path, monkeypatch, flag, target, said):
    (tmp_path / "file.txt").write_text("")
    code, _, err = run_main(main, ["report", "--ledger", str(study), "--out", str(tmp_path / "reports"), flag, str(tmp_path / target)],
                            monkeypatch)
    assert code == 2 and said in err and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "reports").exists()  # nothing built


def test_html_and_latex_into_one_file_is_one_line(study, tmp_path, monkeypatch):
    code, _, err = run_main(main, ["report", "--ledger", str(study), "--html", str(tmp_path / "r"), "--latex", str(tmp_path / "r")],
                            monkeypatch)
    assert code == 2 and "--html and --latex name the same file" in err and len(err.strip().splitlines()) == 1
