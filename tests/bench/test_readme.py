"""The README's Performance table is generated from recorded figures (`python -m bench.readme`), never copied by hand:
each benchmark's latest entry, each figure with its date and machine, and the README shows what bench/figures.json holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import readme
from common.errors import MedfmError
from tests.conftest import REPO

FIXTURE = Path(__file__).parent / "data" / "summary.json"
EXPECTED = """| benchmark | value | target | measured |
|---|---|---|---|
| 12 `probe run` commands / one `probe sweep` command of the same 12 linear heads (process starts included) | 12.4x | >= 10x | 2026-12-08, A |
| the same in one process (library calls: no process start) | 6.5x | >= 5x | 2026-12-08, A |
| int8 tokens with per-token scales / float16 tokens, bytes | 0.51 | <= 0.55 | 2026-12-08, B |
| a DeiT head's test metric, int8 tokens against float16: absolute change | 0.000 |  | 2026-12-08, B |
| tokens: novel_ratio | 1.50 |  | 2026-12-08, B |

Machines: A: 16 cores, NVIDIA-less EPYC, NVIDIA H100 80GB HBM3, torch 2.14.1; B: 2 cores, Intel Xeon, no GPU, torch 2.14.1, \
load average 3.05 at the start.
Not recorded yet: extraction, reads, memory, cache_vs_online, deit_head, bootstrap, images (`make bench` measures them)."""


def a_readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(f"# medfm\n\n## Performance\n\nwords\n\n{readme.BEGIN}\nold, hand-copied\n{readme.END}\n\nmore words\n")
    return path


def test_the_table_written_from_a_summary_is_what_the_command_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, figures = a_readme(tmp_path), tmp_path / "figures.json"
    assert readme.main(["--update", "--summary", str(FIXTURE), "--figures", str(figures), "--readme", str(path)]) == 0
    capsys.readouterr()
    assert readme.main(["--figures", str(figures), "--readme", str(path)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == EXPECTED  # the latest sweep entry, known rows in order, an unknown ratio named by its key
    text = path.read_text()
    start, end = readme.section(text, path)
    assert text[start:end].strip() == printed and "hand-copied" not in text
    assert text.startswith("# medfm\n\n## Performance\n\nwords\n\n") and text.endswith(f"{readme.END}\n\nmore words\n")
    assert readme.main(["--check", "--figures", str(figures), "--readme", str(path)]) == 0


def test_a_hand_edited_table_fails_the_check_and_an_update_keeps_other_benchmarks(tmp_path: Path) -> None:
    path, figures = a_readme(tmp_path), tmp_path / "figures.json"
    readme.update(FIXTURE, figures, path)
    path.write_text(path.read_text().replace("12.4x", "99x"))
    assert readme.main(["--check", "--figures", str(figures), "--readme", str(path)]) == 1
    later = tmp_path / "later.json"
    later.write_text(FIXTURE.read_text().replace('"bench": "tokens"', '"bench": "reads"').replace("novel_ratio", "hdf5_over_memmap"))
    table = readme.update(later, figures, path)
    assert "int8 tokens" in table and "HDF5 cache" in table  # the tokens figures stay, the new benchmark joins


def test_a_readme_without_its_markers_or_a_missing_summary_is_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "README.md"
    plain.write_text("# medfm\n")
    with pytest.raises(MedfmError, match="no single table between the markers"):
        readme.update(FIXTURE, tmp_path / "figures.json", plain)
    with pytest.raises(MedfmError, match="run `make bench` first"):
        readme.update(tmp_path / "none.json", tmp_path / "figures.json", a_readme(tmp_path))


def test_the_readme_shows_what_bench_figures_json_holds() -> None:
    assert readme.README == REPO / "README.md" and readme.main(["--check"]) == 0
