"""`report.figures`: the legend and the notes sit below the axes, long labels clip nothing, RANDOM rows are marked by more
than colour, and a missing cell is drawn as `no run`."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.collections import LineCollection
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from report.figures import GainChart, Panel, Row, ScoreChart, Value, draw_gain, gain_figure, scores_figure

LONG = "openclip-vit-huge-14-laion2b-s32b-b79k frozen-deit (RANDOM backbone and head, extension, off-recipe, 3/4 datasets)"
TITLE = "Relative gain over deit frozen-linear (RANDOM backbone): a baseline with RANDOM weights, not ImageNet pretraining"


def chart() -> GainChart:
    rows = [Row(LONG, "frozen-deit", random=True), Row("deit frozen-linear", "frozen-linear"), Row("dinov2 frozen-linear", "frozen-linear")]
    values = [Value(-12.0, -30.0, 4.0, "-12.00"), Value(0.0, 0.0, 0.0, "0.00 (baseline)"), Value(25.0, 8.0, 41.0, "+25.00")]
    return GainChart(rows, values, TITLE, "relative gain (%)", ["error bars: 95% bootstrap intervals", "no gain: sam frozen-linear (why)"])


def extents(fig) -> dict:
    """Window extents of what a reader must see whole, after the constrained layout ran."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax, foot = fig.axes[0], fig.axes[-1]
    texts = {t.get_text(): t.get_window_extent(renderer) for t in fig.findobj(Text) if t.get_text() and t.get_visible()}
    return {"ax": ax.get_window_extent(renderer), "legend": foot.get_legend().get_window_extent(renderer), "texts": texts,
            "bars": [p.get_window_extent(renderer) for p in ax.patches],
            "whiskers": [Bbox(ax.transData.transform(segment)) for c in ax.collections if isinstance(c, LineCollection)
                         for segment in c.get_segments()],
            "ticks": [t.get_window_extent(renderer) for t in ax.get_yticklabels()], "figure": fig.bbox}


def inside(inner, outer) -> bool:
    return inner.x0 >= outer.x0 - 1 and inner.y0 >= outer.y0 - 1 and inner.x1 <= outer.x1 + 1 and inner.y1 <= outer.y1 + 1


def test_the_gain_legend_and_notes_sit_below_the_axes_covering_no_bar_or_whisker_and_long_labels_clip_nothing():
    fig = gain_figure(chart())
    found = extents(fig)
    legend = found["legend"]
    assert found["bars"] and found["whiskers"]
    assert not legend.overlaps(found["ax"]) and legend.y1 < found["ax"].y0  # below the axes, outside them
    assert not any(legend.overlaps(b) for b in found["bars"] + found["whiskers"])
    title = next(box for text, box in found["texts"].items() if text.startswith("Relative gain over deit"))
    xlabel = found["texts"]["relative gain (%)"]
    notes = found["texts"]["error bars: 95% bootstrap intervals\nno gain: sam frozen-linear (why)"]
    for box in [title, xlabel, notes, legend, *found["ticks"]]:
        assert inside(box, found["figure"])  # nothing clipped at the figure's edge
    assert not any(tick.overlaps(title) or tick.overlaps(xlabel) for tick in found["ticks"])
    assert notes.y1 <= legend.y0 + 1 and not notes.overlaps(xlabel)  # the notes under the legend
    long = [t for t in fig.axes[0].get_yticklabels() if t.get_text().replace("\n", " ") == LONG]
    assert long and "\n" in long[0].get_text()  # wrapped, not one line running into the title
    assert fig.axes[0].patches[0].get_hatch() == "//"  # RANDOM: hatched, not told by colour alone
    plt.close(fig)


def test_draw_gain_returns_the_texts_it_writes_and_an_empty_chart_says_why(tmp_path):
    texts = draw_gain(chart(), tmp_path / "gain.png")
    assert texts == ["-12.00", "0.00 (baseline)", "+25.00", "error bars: 95% bootstrap intervals", "no gain: sam frozen-linear (why)"]
    assert draw_gain(GainChart([], [], "", "", empty="No gain to show: no deit linear run."), tmp_path / "empty.png") == [
        "No gain to show: no deit linear run."]
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_score_figure_draws_a_panel_per_dataset_with_its_test_rows_and_says_no_run_where_a_cell_is_empty():
    rows = [Row("dinov2 frozen-linear", "frozen-linear"), Row("sam frozen-linear (RANDOM backbone)", "frozen-linear", random=True)]
    panels = [Panel("aptos2019\nn = 733 test rows", "quadratic_kappa", [Value(0.81, 0.78, 0.84, "0.810"), Value(0.40, text="0.400")]),
              Panel("isic2019\nn = 2533 test rows", "macro_recall", [Value(0.62, text="0.620"), Value(float("nan"))])]
    fig = scores_figure(ScoreChart(rows, panels, "Test scores per dataset (4 runs)", ["n: the column's test rows."]))
    found = extents(fig)
    assert {"aptos2019\nn = 733 test rows", "isic2019\nn = 2533 test rows", "no run", "test quadratic_kappa"} <= set(found["texts"])
    assert not found["legend"].overlaps(found["ax"])
    hollow = [line for line in fig.axes[0].get_lines() if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1  # the RANDOM row's point
    assert [t.get_text() for t in fig.axes[1].get_yticklabels() if t.get_visible() and t.get_text()] == []  # labels once
    plt.close(fig)
