"""The reliability diagram says what it shows (run, dataset, test rows) and how many rows each bin holds."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from scoring.calibration import BINS, reliability_diagram, reliability_figure


def predictions(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    return labels, rng.normal(size=(n, 3)) + 2 * np.eye(3)[labels]


def test_the_title_names_the_run_the_dataset_and_the_rows_and_each_filled_bin_shows_its_count():
    labels, logits = predictions()
    fig = reliability_figure(labels, logits, temperature=1.5, run="20250101-dinov2-aptos2019-linear-abc", dataset="aptos2019")
    top, below = fig.axes
    assert top.get_title() == "reliability: 20250101-dinov2-aptos2019-linear-abc\naptos2019, n = 300 test rows"
    counts = [int(t.get_text()) for t in below.texts]
    assert sum(counts) == 300 and all(counts)  # every row counted once, in the bins that hold any
    assert len(below.patches) == BINS and sum(p.get_height() for p in below.patches) == 300
    plt.close(fig)


def test_a_diagram_saved_in_a_run_folder_is_named_by_that_folder(tmp_path, monkeypatch):
    labels, logits = predictions(40)
    folder = tmp_path / "20250101-120000-deit-demo-linear-0123456789ab"
    folder.mkdir()
    titles = []

    def drawn(*args, **kwargs):
        fig = reliability_figure(*args, **kwargs)
        titles.append(fig.axes[0].get_title())
        return fig

    monkeypatch.setattr("scoring.calibration.reliability_figure", drawn)
    path = reliability_diagram(folder / "reliability.png", labels, logits)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert titles == [f"reliability: {folder.name}\nn = 40 test rows"]
