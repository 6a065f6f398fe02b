"""Train here, test there, on the released layouts: a linear head trained on ISIC 2019 features is scored on HAM10000's
test split through the shipped label map, and the report's transfer table shows the pair (what `make transfer` runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ledger.store import Ledger
from probe.cli import main as probe_main
from tests.conftest import REPO
from tests.extract.extractions import invoke
from tests.layouts import write_ham10000, write_isic
from tests.stand_ins import RECORDER
from tests.tiny import run_main

INPUTS = ["--norm", "model", "--interpolation", "bilinear", "--image-size", "32", "--workers", "0", "--weights", "random"]


def test_a_head_trained_on_isic2019_is_scored_on_ham10000_and_reported_as_a_transfer_pair(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path / "out"))
    (tmp_path / "isic").mkdir()
    write_isic(tmp_path / "isic", n=40)
    write_ham10000(tmp_path / "ham")
    for dataset, root in (("isic2019", "isic"), ("ham10000", "ham")):
        code, _, err = invoke(["run", "--backbone", "tiny-deit", "--dataset", dataset, "--root", str(tmp_path / root), *INPUTS],
                              monkeypatch)
        assert code == 0, err
    code, _, err = run_main(probe_main, ["run", "--head", "linear", "--backbone", "tiny-deit", "--dataset", "isic2019",
                                         "--epochs", "2"], monkeypatch)
    assert code == 0, err

    code, out, err = run_main(probe_main, ["eval", "--backbone", "tiny-deit", "--dataset", "isic2019", "--on", "ham10000"],
                              monkeypatch)
    assert code == 0, err
    [evaluation] = Ledger().evaluations()
    assert evaluation.dataset == "ham10000" and evaluation.scored_rows > 0 and evaluation.dropped_rows == 0  # all 7 classes map

    code, out, err = run_main(probe_main, ["report", "--evaluations", "transfer"], monkeypatch)
    assert code == 0, err
    assert "isic2019 -> ham10000" in out


@pytest.mark.parametrize("args, said", [
    (["eval"], "name the run to score"),
    (["eval", "--backbone", "deit"], "needs --dataset"),
    (["eval", "3", "--cache", "a.h5", "--on", "ham10000"], "--cache FILE or --on DATASET"),
])
def test_eval_picks_runs_one_way_or_says_how(args: list[str], said: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MEDFM_OUTPUT", str(tmp_path))
    code, _, err = run_main(probe_main, args, monkeypatch)
    assert code == 2 and said in err and "Traceback" not in err


def test_make_transfer_trains_on_the_source_scores_on_the_target_then_reports(tmp_path: Path) -> None:
    """Per pair and backbone: both caches with the same inputs, the frozen heads on the source, each scored on the target."""
    log = tmp_path / "calls.log"
    for tool in ("extract", "probe"):
        (tmp_path / tool).write_text(RECORDER.format(log=log))
        (tmp_path / tool).chmod(0o755)
    subprocess.run(["make", "--no-print-directory", "transfer", f"BIN={tmp_path}", "PY=/bin/sh", "DATA=/data",
                    "TRANSFER_PAIRS=chestxray14:chexpert", "STUDY_BACKBONES=sam", "PAPER_EPOCHS=7"],
                   cwd=REPO, check=True, capture_output=True)
    inputs = "--norm model --interpolation bilinear --in-chans 1"
    assert [c.split(" ", 1)[1] for c in log.read_text().splitlines()] == [
        f"extract run --backbone sam --dataset chexpert --root /data/chexpert {inputs}",
        f"extract run --backbone sam --dataset chestxray14 --root /data/chestxray14 {inputs}",
        "probe sweep --head linear,deit --backbone sam --dataset chexpert --epochs 7",
        "probe eval --backbone sam --dataset chexpert --scenario frozen-linear --on chestxray14 --allow-unmapped",
        "probe eval --backbone sam --dataset chexpert --scenario frozen-deit --on chestxray14 --allow-unmapped",
        "probe report --evaluations transfer",
    ]
