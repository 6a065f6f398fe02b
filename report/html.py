"""`probe report --html FILE`: the whole report as one page a reader opens from disk, prints, and can check.

One self-contained file: no script, no stylesheet or font fetched, every figure embedded as a base64 PNG. The figures are
the report's own files (the gain and score figures of `report.table.write_report`, the critical-difference diagram of
`report.ranking.write_ranking`), never redrawn here, so the page shows exactly what the PNGs beside it show. Beside the
numbers it says what they rest on: each chosen run's folder, config key and cache fingerprint, and the command that
rebuilds the page. Plain HTML and CSS, one column when printed.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shlex
import time
from pathlib import Path

import pandas as pd

from common.errors import MedfmError
from ledger.records import code_version, mean_score
from report.ranking import Ranking
from report.subgroups import summary_lines
from report.table import (
    AVERAGE,
    BASELINE,
    COST_NOTE,
    GAIN,
    ROBUSTNESS_NOTE,
    TRANSFER_NOTE,
    Report,
    baseline_text,
    cost_text,
    evaluation_lines,
    gain_chart,
    is_random,
    left_out_note,
    notes,
)
from scoring.calibration import NAMES as CALIBRATION

NUMBER = re.compile(r"[-+]?\d|-$|\[")  # a cell that starts as a number (or an empty one, `-`) aligns right
CALIBRATION_TITLES = {"ece": "ECE", "ece_adaptive": "adaptive ECE", "brier": "Brier", "nll": "NLL"}
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a; background: #fff;
       max-width: 84rem; margin: 1.5rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.55rem; margin-bottom: .3rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #bbb; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .3rem; }
nav a { margin-right: .9rem; }
.meta, .notes, aside, figcaption { font-size: .85rem; color: #333; }
.notes li { margin: .2rem 0; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border-top: 1px solid #ddd; padding: .3rem .55rem; text-align: left; vertical-align: top; }
th { border-bottom: 2px solid #333; background: #f3f3f3; }
td.num { text-align: right; }
tr.random td:first-child { color: #b00020; font-weight: 600; }
td.code, code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .75rem; }
td.code { text-align: left; word-break: break-all; min-width: 8rem; }
pre { white-space: pre-wrap; word-break: break-all; background: #f5f5f5; padding: .6rem .8rem; }
figure { margin: .8rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #e5e5e5; }
.beside { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.beside figure { flex: 3 1 34rem; margin: 0; }
.beside aside { flex: 1 1 16rem; border-left: 3px solid #0072B2; padding-left: .8rem; }
.reason { border-left: 3px solid #D55E00; padding-left: .8rem; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 10pt; }
  nav { display: none; }
  .wide { overflow: visible; }
  h2, h3 { break-after: avoid; }
  figure, tr, aside { break-inside: avoid; }
}
"""


def check_target(path: Path | None, flag: str) -> None:
    """A file to write must be a file in a writable folder that exists: one line before the report is built, never an
    OSError after minutes of bootstrap."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise MedfmError(f"{flag} {path} is a folder; give the name of a file to write")
    if not path.parent.is_dir():
        state = "is not a folder" if path.parent.exists() else "does not exist"
        raise MedfmError(f"{flag} {path}: the folder {path.parent} {state}; make it first or give a file in an existing folder")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise MedfmError(f"cannot write {flag} {path}: {'the file' if path.exists() else 'its folder'} is read-only")


def write_html(report: Report, path: Path, *, ranking: Ranking | str, command: str, ledger: Path,
               subgroups: tuple[pd.DataFrame, list[str]] | None = None) -> Path:
    """Write the page (`render_html`) to `path`, and name it among the report's files."""
    path.write_text(render_html(report, ranking=ranking, command=command, ledger=ledger, subgroups=subgroups), encoding="utf-8")
    report.files["html"] = path
    return path


def render_html(report: Report, *, ranking: Ranking | str, command: str, ledger: Path,
                subgroups: tuple[pd.DataFrame, list[str]] | None = None) -> str:
    """The page: the table with its intervals, the figures, the ranking (or why none), the robustness, transfer,
    calibration and subgroup tables where the report has them, costs, and the runs and command behind it all."""
    sections = [("scores", "Test scores", _scores(report)), ("gain", "Gain over ImageNet pretraining", _gain(report)),
                ("ranking", "Ranking", _ranking(report, ranking))]
    if report.evaluations is not None and (len(report.evaluations.robustness) or len(report.evaluations.transfer)):
        sections.append(("evaluations", "Robustness and transfer", _evaluations(report)))
    if calibration := _calibration(report):
        sections.append(("calibration", "Calibration", calibration))
    if subgroups is not None:
        sections.append(("subgroups", "Subgroups", _subgroups(*subgroups)))
    sections += [("costs", "Costs", _costs(report)), ("provenance", "Where every number comes from", _provenance(report, command, ledger))]
    nav = "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections)
    body = "\n".join(f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{content}\n</section>' for anchor, title, content in sections)
    datasets = ", ".join(c.header for c in report.columns)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<meta name="viewport" content="width=device-width, '
            f'initial-scale=1">\n<title>medfm report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<header>\n'
            "<h1>Does a natural-domain foundation model beat ImageNet pretraining?</h1>\n"
            f'<p class="meta">{_e(_runs(report.runs))} on {_e(datasets)}; medfm {_e(code_version())}, '
            f'{_e(time.strftime("%Y-%m-%d %H:%M"))}.</p>\n<nav>{nav}</nav>\n</header>\n{body}\n</body>\n</html>\n')


def _scores(report: Report) -> str:
    header = ["backbone x scenario", *(c.header for c in report.columns), AVERAGE, GAIN]
    rows = [([report.rows[key].label, *(report.cell(key, c.label) for c in report.columns), report.summary(key, AVERAGE),
              report.summary(key, GAIN)], "random" if is_random(key) else "") for key in report.table.index]
    return _table(header, rows) + _notes(notes(report))


def _gain(report: Report) -> str:
    """The gain figure with how its bars are aggregated beside it, then the score figure."""
    chart = gain_chart(report)
    if chart.rows:
        how = [f"Each bar: one row's relative gain over {baseline_text(report)}. Per dataset, (score - baseline) / baseline x 100, "
               f"the baseline being the {BASELINE} linear row of the same freeze setting and protocol; then the mean over the "
               f"{len(report.columns)} dataset(s) both rows have (the study's Fig. 1 quantity).",
               *chart.notes]
        if not report.bootstrap:
            how.append("No error bars: the report has no intervals (probe report --ci 95).")
    else:
        how = [chart.empty]
    aside = "<aside><h3>How the gain is aggregated</h3>" + "".join(f"<p>{_e(line)}</p>" for line in how) + "</aside>"
    gain = f'<div class="beside">{_figure(report.files.get("figure"), chart.title or "relative gain")}{aside}</div>'
    return gain + "<h3>Each cell's test score</h3>" + _figure(report.files.get("scores"), "test score of every cell, per dataset")


def _ranking(report: Report, ranking: Ranking | str) -> str:
    if isinstance(ranking, str):
        return f'<p class="reason">No ranking: {_e(ranking)}</p>'
    table = ranking.table
    datasets = [c for c in table.columns if c.startswith("rank on ")]
    rows = [([name, f"{line['mean rank']:.2f} [{line['rank low']:.2f}, {line['rank high']:.2f}]", f"{line['P(best)']:.2f}",
              *(f"{line[d]:g}" for d in datasets)], "") for name, line in table.iterrows()]
    out = _table(["backbone x scenario", f"mean rank [{ranking.level:g}% interval]", "P(best)", *datasets], rows)
    if ranking.posthoc is not None:
        out += _figure(report.files.get("ranking diagram"), "critical-difference diagram")
    pairs = [([line["row a"], line["row b"], f"{line['difference']:+.4f} [{line['ci low']:+.4f}, {line['ci high']:+.4f}]",
               f"{line['p holm']:.3g}", f"{line['wins']}/{line['ties']}/{line['losses']}", line["verdict"], f"{line['detectable']:.4f}"],
              "") for line in ranking.pairs.to_dict("records")]
    out += "<h3>Pairs</h3>" + _table(["row a", "row b", "a - b [interval]", "p (Holm)", "datasets won/tied/lost", "verdict",
                                      "detectable difference"], pairs)
    return out + _notes(ranking.notes)


def _evaluations(report: Report) -> str:
    tables = report.evaluations
    assert tables is not None
    out = ""
    for lines in evaluation_lines(tables):
        robustness = lines[0][1] == "dataset"
        out += f"<h3>{'Relative drop (%) under corruption' if robustness else 'Transfer to other datasets'}</h3>"
        out += _table(lines[0], [(line, "") for line in lines[1:]]) + _notes([ROBUSTNESS_NOTE if robustness else TRANSFER_NOTE])
    return out + (_notes([left_out_note(tables.left_out)]) if tables.left_out else "")


def _calibration(report: Report) -> str:
    """Each cell's calibration metrics (single-label runs store them), the mean over its chosen runs; "" when none has any."""
    fitted = f"{CALIBRATION[0]}_calibrated"  # after temperature scaling (`probe run --calibrate`)
    names = [*CALIBRATION, *([fitted] * any(fitted in r.test_metrics for runs in report.chosen.values() for r in runs))]
    rows = []
    for key in report.table.index:
        for c in report.columns:
            runs = [r for r in report.chosen.get((key, c.label), []) if CALIBRATION[0] in r.test_metrics]
            if runs:
                rows.append(([report.rows[key].label, c.label, *(_number(mean_score([r.test_metrics.get(n) for r in runs])) for n in names)], ""))
    if not rows:
        return ""
    header = ["backbone x scenario", "dataset", *(CALIBRATION_TITLES.get(n, "ECE after temperature") for n in names)]
    return _table(header, rows) + _notes([
        "Test-split calibration of the softmax, the mean over the cell's chosen runs; lower is better (scoring/calibration.py: 15 "
        "bins). ECE after temperature: with a temperature fitted on validation (probe run --calibrate). Each run's reliability "
        "diagram is reliability.png in its run folder (listed below)."])


def _subgroups(table: pd.DataFrame, lines: list[str]) -> str:
    column = str(table["column"].iloc[0]) if len(table) else ""
    rows = [(list(line), "") for line in summary_lines(table)]
    return _table(["backbone x scenario", "dataset", f"{column}: score [interval] (n) per group", "worst group", "gap (best - worst)"],
                  rows) + _notes(lines)


def _costs(report: Report) -> str:
    rows = [([report.rows[key].label, cost_text(report.costs.get(key, {}))], "") for key in report.table.index]
    total = f"Total of the grid ({_runs(report.runs)}, each cache's extraction once): {cost_text(report.total_cost)}."
    return _table(["backbone x scenario", "cost of its chosen runs"], rows) + _notes([COST_NOTE, total])


def _provenance(report: Report, command: str, ledger: Path) -> str:
    """The command that rebuilds this page, then every run a cell averages: its folder, config key and cache fingerprint."""
    where = [f"cd {shlex.quote(os.getcwd())}"]
    if "MEDFM_OUTPUT" in os.environ:
        where.append(f"export MEDFM_OUTPUT={shlex.quote(os.environ['MEDFM_OUTPUT'])}")
    out = (f"<p>This page, from the results ledger <code>{_e(ledger)}</code>:</p><pre>{_e(chr(10).join([*where, command]))}</pre>"
           "<p>The runs behind each cell: the configuration chosen by validation, one line per seed (or fold).</p>")
    rows = []
    for key in report.table.index:
        for c in report.columns:
            for r in report.chosen.get((key, c.label), []):
                rows.append(([report.rows[key].label, c.label, str(r.seed), str(r.id), r.run_dir or "-", r.config_key,
                              r.cache_fingerprint or "- (live images)", r.code_version, json.dumps(r.config, sort_keys=True)], ""))
    out += _table(["backbone x scenario", "dataset", "seed", "ledger id", "run folder", "config key", "cache fingerprint",
                   "code version", "config"], rows, code_from=4)
    files = [([name, str(path)], "") for name, path in report.files.items() if name != "html"]
    return out + "<h3>Files of this report</h3>" + _table(["file", "path"], files, code_from=1)


def _table(header: list[str], rows: list[tuple[list[str], str]], code_from: int | None = None) -> str:
    """An HTML table: a header, then rows of (cells, row class); numbers align right, cells from `code_from` on are set
    as code (paths, hashes)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    lines = []
    for cells, kind in rows:
        tds = "".join(f"<td{_kind(v, code_from is not None and i >= code_from)}>{_e(v)}</td>" for i, v in enumerate(cells))
        lines.append(f'<tr class="{kind}">{tds}</tr>' if kind else f"<tr>{tds}</tr>")
    return f'<div class="wide"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(lines) + "\n</tbody></table></div>"


def _kind(value: str, code: bool) -> str:
    if code:
        return ' class="code"'
    return ' class="num"' if NUMBER.match(value) else ""


def _figure(path: Path | None, alt: str) -> str:
    """The report's PNG `path` embedded as base64: the page needs no file beside it."""
    if path is None or not Path(path).is_file():
        return f'<p class="reason">Figure not drawn: {_e(alt)}.</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"><figcaption>{_e(Path(path).name)}</figcaption></figure>'


def _notes(lines: list[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>" if lines else ""


def _number(value: float) -> str:
    return f"{value:.4f}" if value == value else "-"  # NaN: not recorded


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
