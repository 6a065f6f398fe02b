"""The folder layout is the architecture: imports run one way (docs/architecture.md, "Layering")."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("common", "cache", "extract", "probe", "finetune", "grid")
# what each package may import from the project (besides itself)
ALLOWED = {
    "common": set(),
    "cache": {"common"},
    "extract": {"common", "cache"},
    "probe": {"common", "cache"},
    "finetune": {"common", "cache", "extract", "probe"},
    "grid": {"common", "cache", "extract", "probe", "finetune"},  # the grid runs the stages as commands; nothing imports it
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports, wherever the import statement sits (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def test_imports_run_one_way_and_nothing_imports_finetune_or_grid():
    broken = []
    for package in PACKAGES:
        for module in sorted((REPO / package).rglob("*.py")):
            bad = project_imports(module) - ALLOWED[package] - {package}
            if bad:
                broken.append(f"{module.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert broken == []


def test_the_rule_catches_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finetune.train import finetune\n")
    assert project_imports(module) == {"finetune"}
