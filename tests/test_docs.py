"""Every reference to the docs resolves: the code cites `docs/<file>.md §N` or `docs/<file>.md, "Section"`,
and a fresh clone must hold that file and that section. Nothing cites notes that are not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

SOURCES = ("common", "cache", "scoring", "ledger", "training", "extract", "report", "probe", "finetune", "grid", "bench", "tests", "docs")
REFERENCE = re.compile(r'docs/(?P<file>[\w-]+\.md)(?:,? ?(?P<sections>(?:§\d+(?:, | and )?)+)|, "(?P<title>[^"]+)")?')
FOREIGN = re.compile(r"\bpaper\.md\b|\bDESIGN\.md\b|(?<![\w-])research/|\.\./shared")


def texts() -> list[tuple[Path, str]]:
    files = [REPO / "README.md", REPO / "Makefile", *(p for d in SOURCES for p in (REPO / d).rglob("*") if p.suffix in (".py", ".md"))]
    return [(f, f.read_text()) for f in files if f != Path(__file__)]


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


def unresolved(text: str) -> list[str]:
    missing = []
    for match in REFERENCE.finditer(text):
        doc = REPO / "docs" / match["file"]
        if not doc.is_file():
            missing.append(f"docs/{match['file']} does not exist")
            continue
        titles = headings(doc)
        for number in re.findall(r"§(\d+)", match["sections"] or ""):
            if not any(t.startswith(f"§{number} ") for t in titles):
                missing.append(f"docs/{match['file']} has no §{number}")
        if match["title"] and not any(t.startswith(match["title"]) for t in titles):
            missing.append(f'docs/{match["file"]} has no section "{match["title"]}"')
    return missing


def test_every_docs_reference_resolves_to_a_file_and_section():
    broken = [f"{path.relative_to(REPO)}: {problem}" for path, text in texts() for problem in unresolved(text)]
    assert broken == []
    assert sum(len(REFERENCE.findall(text)) for _, text in texts()) > 10  # the code does cite its docs


def test_nothing_points_at_notes_outside_the_repository():
    assert [str(p.relative_to(REPO)) for p, text in texts() if FOREIGN.search(text)] == []


def test_the_checker_catches_a_missing_section_and_a_missing_file():
    assert unresolved("see docs/protocol.md §99") == ["docs/protocol.md has no §99"]
    assert unresolved('see docs/architecture.md, "No such part"') == ['docs/architecture.md has no section "No such part"']
    assert unresolved("see docs/nowhere.md") == ["docs/nowhere.md does not exist"]
    assert unresolved("see docs/protocol.md §5, §6") == []


PACKAGES = ("common", "cache", "scoring", "ledger", "training", "extract", "report", "probe", "finetune", "grid", "bench")
PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(PACKAGES)}|tests)/[\w/.-]*\.(?:py|json|md))")
DOTTED = re.compile(rf"`((?:{'|'.join(PACKAGES)})(?:\.\w+)+)`")


def stale_names(text: str) -> list[str]:
    """The project's file paths and `module.name` references in `text` that do not exist."""
    import importlib

    stale = [path for path in PATH.findall(text) if not (REPO / path).exists()]
    for dotted in DOTTED.findall(text):
        if dotted.rsplit(".", 1)[-1] in ("json", "md", "csv", "png", "h5", "py", "tsv"):
            continue  # a file name such as `grid.json`
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                found = getattr(found, attr, None)
            if found is None:
                stale.append(dotted)
            break
        else:
            stale.append(dotted)
    return stale


def test_every_file_and_name_the_docs_cite_exists() -> None:
    texts_ = [(REPO / "README.md").read_text(), (REPO / "Makefile").read_text(), *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    assert sorted({name for text in texts_ for name in stale_names(text)}) == []


def test_a_moved_module_is_caught() -> None:
    assert stale_names("see `probe/results.py` and `probe.recipe.improves`, not `training.recipe.improves`") == [
        "probe/results.py", "probe.recipe.improves"]
