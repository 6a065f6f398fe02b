"""`probe report --latex`: booktabs tables (the scores with their intervals, the ranking) that a stock pdflatex compiles
(Debian's texlive-latex-base and texlive-latex-recommended, which .ci/run installs), whatever the labels hold."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ledger.store import Ledger
from probe.cli import main
from report.latex import escape, pdflatex_unset, render_latex
from report.table import build_report
from tests.conftest import tool
from tests.ledgers import train
from tests.probe.caches import make_cache
from tests.tiny import run_main

NAME = r"ward_a 50% & #1 {x} ~^\$ <y> --z"  # every LaTeX special, and a dash ligature, in a dataset's name
DOCUMENT = r"""\documentclass{article}
\usepackage{booktabs}
\begin{document}
\input{tables}
\end{document}
"""


@pytest.fixture
def ledger(isolated_outputs: Path) -> Path:
    """Two backbones on one dataset, with stored predictions: a ranking of two rows."""
    for number, (backbone, separation) in enumerate((("deit", 0.5), ("dinov2", 2.5))):
        cache = make_cache(isolated_outputs / "features" / backbone / f"demo-{number}aaaaaaaaaaa.h5", backbone=backbone, tokens=None,
                           separation=separation, settings={"backbone": backbone})
        train(cache, solver="adamw", epochs=2)
    return Ledger().path


def compiles(folder: Path, tables: str) -> subprocess.CompletedProcess:
    (folder / "tables.tex").write_text(tables)
    (folder / "doc.tex").write_text(DOCUMENT)
    return subprocess.run([tool("pdflatex"), "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=folder, capture_output=True,
                          text=True, timeout=120)


def test_every_special_is_escaped() -> None:
    assert escape(NAME) == (r"ward\_a 50\% \& \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}\$ "
                            r"\textless{}y\textgreater{} -{}-z")


def test_the_tables_hold_scores_with_intervals_and_the_ranking_and_compile(ledger, isolated_outputs, monkeypatch):
    path = isolated_outputs / "tables.tex"
    code, out, err = run_main(main, ["report", "--boot", "100", "--name", f"demo={NAME}", "--latex", str(path)], monkeypatch)
    assert code == 0, err
    assert f"latex:{path}" in "".join(out.split())  # among the files printed (wrapped to the terminal)
    tables = path.read_text()
    assert tables.count(r"\toprule") == 2 and r"\label{tab:medfm-scores}" in tables and r"\label{tab:medfm-ranking}" in tables
    body = "\n".join(line for line in tables.splitlines() if not line.startswith("%"))  # the comments quote the command
    assert escape(NAME) in body and NAME not in body
    assert r"{\scriptsize [0." in tables and "95\\% bootstrap interval below each score" in tables  # --ci 95 unless --ci
    assert "dinov2 frozen-linear" in tables.split(r"\label{tab:medfm-ranking}")[1]
    done = compiles(isolated_outputs, tables)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (isolated_outputs / "doc.pdf").stat().st_size > 0


def test_without_a_ranking_the_file_says_why_in_a_comment_and_still_compiles(ledger, isolated_outputs):
    report = build_report([r for r in Ledger(ledger).rows() if r.backbone == "deit"])
    tables = render_latex(report, "a ranking needs at least two rows;\nthe report has 1", "probe report --latex t.tex")
    assert "% no ranking: a ranking needs at least two rows;\n% the report has 1" in tables and tables.count(r"\toprule") == 1
    assert compiles(isolated_outputs, tables).returncode == 0


def test_labels_in_latin_letters_compile_and_others_are_named_in_the_header(ledger, isolated_outputs, monkeypatch):
    """A stock pdflatex sets accented Latin letters and common signs, and refuses Greek, CJK and a few Latin letters
    ("Unicode character ... not set up"): those stay as written, and the file's header names them and the way out."""
    latin, other = "Hautläsionen µm ± 5° – naïve ß € Łódź", "α-ward 肺"
    assert pdflatex_unset(latin) == [] and pdflatex_unset("α-ward 肺 ≥ ą") == sorted("α肺≥ą")
    for label in (latin, other):
        path = isolated_outputs / "tables.tex"
        code, _, err = run_main(main, ["report", "--boot", "100", "--name", f"demo={label}", "--latex", str(path)], monkeypatch)
        assert code == 0, err
        tables = path.read_text(encoding="utf-8")
        assert label in tables
        said = [line for line in tables.splitlines() if "stock pdflatex does not set" in line]
        done = compiles(isolated_outputs, tables)
        if label == latin:
            assert said == [] and done.returncode == 0, done.stdout[-3000:]
        else:
            assert said == ["% the labels hold α 肺, which a stock pdflatex does not set: compile with xelatex or lualatex, "
                            "or give each a \\DeclareUnicodeCharacter in the preamble"]
            assert done.returncode != 0 and "not set up for use with LaTeX" in done.stdout  # what the line warns of
