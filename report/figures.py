"""The report's figures: the gain over the baseline (`draw_gain`) and the absolute test scores (`draw_scores`).

`report.table` decides what a figure shows (each value, its interval, the baseline as it ran, the rows without a gain
and why) and hands it over as plain data (`GainChart`, `ScoreChart`); this module only draws, so a layout can change
without touching a number, and it imports nothing of the report (the table imports it).

Both figures use the Okabe-Ito palette, safe for the common colour-vision deficiencies, and mark RANDOM rows by a
hatch or a hollow marker too, never by colour alone. The layout is constrained, long row labels are wrapped, and the
legend and the notes sit below the axes, so none of them covers a bar, a whisker, the title or an axis label.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # a second cue beside the colour, for lines and points
SCENARIO_COLORS = dict(zip(("frozen-linear", "frozen-deit", "unfrozen-linear", "unfrozen-deit", "frozen-knn", "zero-shot"),
                           OKABE_ITO, strict=False))
OTHER_COLOR = "#999999"  # partial unfreezing (last<K>-...) and any newer scenario
LABEL_WIDTH, TITLE_WIDTH = 34, 90  # characters before a row label, a title wraps
NOTE_CHARS = 13  # characters of a note per inch of the figure's width
GAIN_WIDTH = 9.0  # inches
DPI = 120


@dataclass(frozen=True)
class Row:
    """A row of the report as a figure shows it."""

    label: str
    scenario: str  # picks the colour
    random: bool = False  # RANDOM weights: a hatched bar, a hollow marker


@dataclass(frozen=True)
class Value:
    """One number to draw, with its interval when one was computed."""

    value: float  # NaN: nothing to draw
    low: float | None = None
    high: float | None = None
    text: str = ""  # written beside it


@dataclass(frozen=True)
class GainChart:
    """One bar per row with a gain, bottom to top."""

    rows: list[Row]
    values: list[Value]
    title: str  # names the baseline as it ran
    xlabel: str
    notes: list[str] = field(default_factory=list)  # under the legend: what the whiskers are, the rows without a gain and why
    empty: str = ""  # why no bar is drawn, when none is


SIGNED_METRICS = ("quadratic_kappa",)  # scores that reach down to -1; every other primary metric lies in [0, 1]


@dataclass(frozen=True)
class Panel:
    """One dataset column: its title (its name and test rows), its metric and a value per row of the chart."""

    title: str
    metric: str
    values: list[Value]


@dataclass(frozen=True)
class ScoreChart:
    """A panel per dataset column, the rows top to bottom."""

    rows: list[Row]
    panels: list[Panel]
    title: str
    notes: list[str] = field(default_factory=list)


def color(scenario: str) -> str:
    return SCENARIO_COLORS.get(scenario, OTHER_COLOR)


def wrap(text: str, width: int = LABEL_WIDTH) -> str:
    """Wrapped at `width` characters: a long row label grows down, never into the title or across the axes."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def draw_gain(chart: GainChart, path: Path) -> list[str]:
    """Save the gain chart (`gain_figure`) as a PNG; returns the texts written on it: each bar's, then the notes, or why
    it is empty."""
    save(gain_figure(chart), path)
    return [v.text for v in chart.values] + chart.notes if chart.rows else [chart.empty]


def gain_figure(chart: GainChart) -> Figure:
    """A horizontal bar per row, coloured by scenario, its interval as a whisker and its text beside it; the baseline is
    the dashed line at 0. Without bars, the figure says why instead of staying empty."""
    fig, (ax,), foot = _frame(1, GAIN_WIDTH, 0.45 * max(len(chart.rows), 1) + 2.4 + 0.15 * len(chart.notes))
    if not chart.rows:
        ax.text(0.5, 0.5, chart.empty, ha="center", va="center", wrap=True, fontsize=10, transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    values = np.array([v.value for v in chart.values], dtype=float)
    low, high = _bounds(chart.values)
    whiskers = np.clip(np.stack([values - low, high - values]), 0, None) if any(v.low is not None for v in chart.values) else None
    bars = ax.barh(range(len(values)), values, color=[color(r.scenario) for r in chart.rows], edgecolor="black", linewidth=0.4,
                   xerr=whiskers, error_kw={"elinewidth": 1, "capsize": 3, "ecolor": "black"})
    span = max(float(np.abs(np.concatenate([low, high])).max()), 1.0)
    for bar, row, value, lo, hi in zip(bars, chart.rows, chart.values, low, high, strict=True):
        bar.set_hatch("//" if row.random else "")
        right = value.value >= 0
        ax.text((hi if right else lo) + (0.02 if right else -0.02) * span, bar.get_y() + bar.get_height() / 2, value.text,
                va="center", ha="left" if right else "right", fontsize=8)
    ax.set_yticks(range(len(values)), [wrap(r.label) for r in chart.rows], fontsize=8)
    ax.set_xlim(-1.3 * span if low.min() < 0 else -0.1 * span, 1.3 * span if high.max() > 0 else 0.1 * span)
    line = ax.axvline(0, color="black", linewidth=1.2, linestyle="--", label="baseline (0 %)")
    ax.set_xlabel(chart.xlabel)
    fig.suptitle(wrap(chart.title, TITLE_WIDTH), fontsize=10)
    _legend_and_notes(foot, GAIN_WIDTH, [*_scenario_handles(r.scenario for r in chart.rows), *_random_handle(chart.rows, "hatched"), line],
                      chart.notes)
    return fig


def draw_scores(chart: ScoreChart, path: Path) -> list[str]:
    """Save the score chart (`scores_figure`) as a PNG; returns the texts written on it: each panel's title and values,
    then the notes."""
    save(scores_figure(chart), path)
    return [text for panel in chart.panels for text in (panel.title, *(v.text for v in panel.values if v.text))] + chart.notes


def scores_figure(chart: ScoreChart) -> Figure:
    """A panel per dataset: each row's test score as a point, its interval as a whisker, its value beside it; `no run`
    where the row has none, so a missing cell is seen, not guessed."""
    width = 2.8 + 3.2 * len(chart.panels)
    fig, axes, foot = _frame(len(chart.panels), width, 0.4 * max(len(chart.rows), 1) + 2.8 + 0.15 * len(chart.notes), sharey=True)
    for ax, panel in zip(axes, chart.panels, strict=True):
        _panel(ax, chart.rows, panel)
        ax.tick_params(labelleft=ax is axes[0])
    axes[0].set_yticks(range(len(chart.rows)), [wrap(r.label) for r in chart.rows], fontsize=8)
    axes[0].set_ylim(len(chart.rows) - 0.5, -0.5)  # the first row on top
    fig.suptitle(wrap(chart.title, TITLE_WIDTH), fontsize=10)
    _legend_and_notes(foot, width, [*_scenario_handles(r.scenario for r in chart.rows), *_random_handle(chart.rows, "hollow")],
                      chart.notes)
    return fig


def _panel(ax: plt.Axes, rows: list[Row], panel: Panel) -> None:
    """One dataset's points, row i at y = i."""
    for i, (row, value) in enumerate(zip(rows, panel.values, strict=True)):
        if not np.isfinite(value.value):
            ax.text(0.02, i, "no run", color=OTHER_COLOR, fontsize=7, va="center", transform=ax.get_yaxis_transform())
            continue
        (low,), (high,) = _bounds([value])
        shade = color(row.scenario)
        ax.errorbar(value.value, i, xerr=[[value.value - low], [high - value.value]] if value.low is not None else None, fmt="o",
                    color=shade, mfc="white" if row.random else shade, ecolor=shade, capsize=3, markersize=6)
        ax.annotate(value.text, (high, i), xytext=(5, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_title("\n".join(wrap(line, 30) for line in panel.title.split("\n")), fontsize=9)
    ax.set_xlabel(f"test {panel.metric}", fontsize=9)
    ax.margins(x=0.3)
    low, high = ax.get_xlim()
    floor = -1.0 if panel.metric in SIGNED_METRICS else 0.0
    ax.set_xlim(max(low, floor), min(high, 1.0 + 0.12 * (min(high, 1.0) - max(low, floor))))  # a score lies in [0, 1]: room for its label
    ax.grid(axis="x", alpha=0.3)


def _bounds(values: list[Value]) -> tuple[np.ndarray, np.ndarray]:
    """Each value's interval, the value itself where none (or an undefined one) was computed."""
    def bound(v: Value, end: float | None) -> float:
        return end if end is not None and np.isfinite(end) else v.value

    return np.array([bound(v, v.low) for v in values]), np.array([bound(v, v.high) for v in values])


def _scenario_handles(scenarios: Iterable[str]) -> list[Artist]:
    return [Patch(facecolor=color(s), edgecolor="black", linewidth=0.4, label=s) for s in dict.fromkeys(scenarios)]


def _random_handle(rows: list[Row], how: str) -> list[Artist]:
    """The legend's key to RANDOM rows, when there are any: a hatched patch or a hollow marker."""
    if not any(r.random for r in rows):
        return []
    if how == "hatched":
        return [Patch(facecolor="white", edgecolor="black", hatch="//", label="RANDOM weights (hatched)")]
    return [Line2D([], [], marker="o", linestyle="", color="black", mfc="white", label="RANDOM weights (hollow)")]


def _frame(panels: int, width: float, height: float, sharey: bool = False) -> tuple[Figure, list[plt.Axes], plt.Axes]:
    """A constrained figure of `panels` axes side by side over a flat footer spanning them, which holds the legend and
    the notes: the layout makes room for both below the axes, so neither covers what the axes draw."""
    fig = plt.figure(figsize=(width, height), layout="constrained")
    grid = fig.add_gridspec(2, panels, height_ratios=[1, 1e-3])
    first = fig.add_subplot(grid[0, 0])
    axes = [first, *(fig.add_subplot(grid[0, i], sharey=first if sharey else None) for i in range(1, panels))]
    foot = fig.add_subplot(grid[1, :])
    foot.set_axis_off()
    return fig, axes, foot


def _legend_and_notes(foot: plt.Axes, width: float, handles: list[Artist], notes: list[str]) -> None:
    """The legend in the footer, the notes under it, wrapped to the figure's `width` (inches)."""
    legend = foot.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(handles), 4), fontsize=8,
                         frameon=False)
    if notes:
        foot.annotate("\n".join(wrap(n, int(width * NOTE_CHARS)) for n in notes), xy=(0.5, 0), xycoords=legend, xytext=(0, -2),
                      textcoords="offset points", ha="center", va="top", fontsize=8, annotation_clip=False)


def save(fig: Figure, path: Path) -> None:
    """The figure as a PNG, then closed: a report draws many, and pyplot keeps each open figure alive."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
