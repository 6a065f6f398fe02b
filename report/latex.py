"""`probe report --latex FILE`: the report's table with its intervals and the ranking, as booktabs tables to paste.

The file holds `table` floats to `\\input` into a paper whose preamble loads booktabs (Debian's texlive-latex-recommended
has it); nothing else beyond a stock LaTeX. Every label is escaped (`escape`), so a dataset named `ward_a 50%` compiles.
A cell shows its score over its interval, n (seeds averaged) and its marks, in 3 decimals (gains in 2, in %); the CSV
beside it keeps 4. A report without a ranking says why in a comment, so the file always compiles.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ledger.records import code_version
from report.ranking import Ranking
from report.table import AVERAGE, BASELINE, GAIN, Report, notes

SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
            "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
LABEL_COLUMN = r"p{0.28\linewidth}"  # the row labels wrap: a stock p column, no array package
# Beyond ASCII, what a stock pdflatex (UTF-8 input, the default OT1 fonts) sets: Latin-1 and Latin Extended-A but these,
# which it refuses (each compiled alone, TeX Live 2022), and the common dashes, quotes and signs
PDFLATEX_REFUSES = frozenset("«»ÐÞðþĄąĐđĘęĦħĮįĸĿŀŉŊŋŦŧŲųſ")
PDFLATEX_ALSO_SETS = frozenset("–—‘’“”…•€™")


def escape(text: object) -> str:
    """`text` as LaTeX prints it literally: its specials escaped, and < > | and the dash ligatures (`--epochs`), which the
    default font encoding misprints."""
    return re.sub(r"-(?=-)", "-{}", "".join(SPECIALS.get(c, c) for c in str(text)))


def pdflatex_unset(text: str) -> list[str]:
    """The characters of `text` a stock pdflatex refuses ("Unicode character ... not set up for use with LaTeX"): Greek,
    CJK, most symbols, a few Latin letters. The labels keep them as they are, since xelatex and lualatex set them."""
    return sorted({char for char in text if not _pdflatex_sets(char)})


def _pdflatex_sets(char: str) -> bool:
    return char.isascii() or ("\u00a0" <= char <= "\u017f" and char not in PDFLATEX_REFUSES) or char in PDFLATEX_ALSO_SETS


def write_latex(report: Report, path: Path, ranking: Ranking | str, command: str) -> Path:
    """Write the tables (`render_latex`) to `path`, and name it among the report's files."""
    path.write_text(render_latex(report, ranking, command), encoding="utf-8")
    report.files["latex"] = path
    return path


def render_latex(report: Report, ranking: Ranking | str, command: str) -> str:
    """The score table, then the ranking's (or a comment saying why there is none)."""
    head = ["% medfm report tables: \\input this file in a document with \\usepackage{booktabs}.",
            f"% {' '.join(command.splitlines())}  (medfm {code_version()}, {_runs(report.runs)})"]
    tables = [scores_table(report), "", ranking_table(ranking)]
    unset = pdflatex_unset("\n".join(tables))
    if unset:
        head.append(f"% the labels hold {' '.join(unset)}, which a stock pdflatex does not set: compile with xelatex or "
                    "lualatex, or give each a \\DeclareUnicodeCharacter in the preamble")
    return "\n".join([*head, "", *tables]) + "\n"


def scores_table(report: Report) -> str:
    """Rows backbone x scenario; a column per dataset, then the average and the gain over the baseline."""
    header = ["backbone $\\times$ scenario", *(_stack(escape(c.label), escape(c.metric)) for c in report.columns), AVERAGE,
              f"gain vs {BASELINE} linear (\\%)"]
    lines = []
    for key in report.table.index:
        cells = [_cell(report, key, c.label) for c in report.columns]
        cells += [_summary(report, key, AVERAGE, False), _summary(report, key, GAIN, True)]
        lines.append(" & ".join([_label(report.rows[key].label), *cells]) + r" \\")
    level = f"{report.bootstrap['level']:g}\\% bootstrap interval below each score; " if report.bootstrap else ""
    caption = (f"Test scores ({_runs(report.runs)}) of the configuration with the best mean validation score over its seeds; "
               f"{level}n: seeds averaged; gain: mean relative gain over the {BASELINE} linear baseline.")
    return _float("tab:medfm-scores", caption, LABEL_COLUMN + "c" * (len(header) - 1), header, lines, notes(report))


def ranking_table(ranking: Ranking | str) -> str:
    """Each complete row's mean rank with its interval, its probability of ranking first and its rank per dataset."""
    if isinstance(ranking, str):
        return "\n".join(f"% {line}" for line in f"no ranking: {ranking}".splitlines())
    datasets = [c for c in ranking.table.columns if c.startswith("rank on ")]
    header = ["backbone $\\times$ scenario", "mean rank", f"{ranking.level:g}\\% interval", "P(best)",
              *(escape(d.removeprefix("rank on ")) for d in datasets)]
    lines = [" & ".join([_label(name), f"{line['mean rank']:.2f}", f"[{line['rank low']:.2f}, {line['rank high']:.2f}]",
                         f"{line['P(best)']:.2f}", *(f"{line[d]:g}" for d in datasets)]) + r" \\"
             for name, line in ranking.table.iterrows()]
    caption = (f"Mean rank over {len(datasets)} dataset(s) (1 is best), its {ranking.level:g}\\% bootstrap interval over "
               f"{ranking.boot} resamples, and the probability of ranking first.")
    return _float("tab:medfm-ranking", caption, LABEL_COLUMN + "c" * (len(header) - 1), header, lines, ranking.notes)


def _float(label: str, caption: str, columns: str, header: list[str], lines: list[str], notes: list[str]) -> str:
    return "\n".join([
        r"\begin{table}[htbp]", r"\centering", r"\small", f"\\caption{{{caption}}}", f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{columns}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule", *lines, r"\bottomrule",
        r"\end{tabular}", r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize",
        *(escape(line) + r"\par" for line in notes), r"\end{minipage}", r"\end{table}"])


def _label(text: str) -> str:
    """A row label, wrapped ragged within its column (labels carry their marks: `(RANDOM backbone, off-recipe)`)."""
    return r"\raggedright " + escape(text)


def _cell(report: Report, key: tuple, label: str) -> str:
    """`0.938` over `[0.910, 0.960] n=3, late` in small type; `--` without a score."""
    value = report.table.loc[key, label]
    if not math.isfinite(value):
        return "--"
    flags = ["late"] * bool(report.late.loc[key, label]) + report.marks(key, label)
    below = " ".join(part for part in (_bounds(report, key, label, False), f"n={int(report.seeds.loc[key, label])}") if part)
    return _stack(f"{value:.3f}", escape(", ".join([below, *flags])))


def _summary(report: Report, key: tuple, name: str, percent: bool) -> str:
    value = report.table.loc[key, name]
    if not math.isfinite(value):
        return "--"
    bounds = _bounds(report, key, name, percent)
    return _stack(_number(value, percent), bounds) if bounds else _number(value, percent)


def _bounds(report: Report, key: tuple, name: str, percent: bool) -> str:
    found = report.intervals.get((key, name))
    return f"[{_number(found.low, percent)}, {_number(found.high, percent)}]" if found is not None else ""


def _number(value: float, percent: bool) -> str:
    if not math.isfinite(value):
        return "--"
    return f"${value:+.2f}$" if percent else f"{value:.3f}"


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def _stack(top: str, below: str) -> str:
    """Two centred lines in one cell, the second in small type: stock LaTeX, no makecell."""
    return f"\\begin{{tabular}}[t]{{@{{}}c@{{}}}}{top}\\\\{{\\scriptsize {below}}}\\end{{tabular}}"
