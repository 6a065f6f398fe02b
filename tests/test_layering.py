"""The folder layout is the architecture: imports run one way between rooms, and no module imports itself back through
others (docs/architecture.md, "Layering")."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# what each room may import from the project (besides itself), lowest floor first
ALLOWED = {
    "common": set(),
    "cache": {"common"},
    "scoring": {"common", "cache"},
    "ledger": {"common", "cache"},
    "extract": {"common", "cache"},
    "training": {"common", "cache", "scoring", "ledger"},
    "report": {"common", "cache", "scoring", "ledger", "training"},
    "predict": {"common", "cache", "scoring", "ledger", "training", "extract"},  # back to images: the one command that needs extract
    "probe": {"common", "cache", "scoring", "ledger", "training", "report", "predict"},
    "finetune": {"common", "cache", "scoring", "ledger", "training", "extract"},
    "grid": {"common", "cache", "ledger", "extract"},  # the grid runs the stages as commands, never imports them
    "bench": {"common", "cache", "scoring", "ledger", "training", "extract", "report", "predict", "probe", "finetune"},
}
PACKAGES = tuple(ALLOWED)


def imported_modules(path: Path, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """Project modules a module imports, wherever the import statement sits (lazy and TYPE_CHECKING imports count);
    `from pkg import name` names the submodule `pkg.name` when there is one, else `pkg`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {name for name in found if name.split(".")[0] in packages}


def module_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (only names that are modules of the tree)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: {m for m in imported_modules(path, packages) if m in modules and m != name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_run_one_way_between_rooms():
    broken = []
    for package in PACKAGES:
        for module in sorted((REPO / package).rglob("*.py")):
            bad = {m.split(".")[0] for m in imported_modules(module)} - ALLOWED[package] - {package}
            if bad:
                broken.append(f"{module.relative_to(REPO)} imports {', '.join(sorted(bad))}")
    assert broken == []


def test_no_import_cycle_between_modules():
    assert cycles(module_graph(REPO)) == []


def test_the_rules_catch_a_forbidden_import_and_a_planted_cycle(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from finetune.train import finetune\n")
    assert imported_modules(module) == {"finetune.train", "finetune.train.finetune"}
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "a.py").write_text("from probe.b import g\n")
    (tmp_path / "probe" / "b.py").write_text("def g():\n    from probe import a  # lazy: still an edge\n")
    (tmp_path / "probe" / "c.py").write_text("from probe.a import x\n")
    assert cycles(module_graph(tmp_path, ("probe",))) == [["probe.a", "probe.b"]]
