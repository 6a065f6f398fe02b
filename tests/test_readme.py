"""The README's commands work as written: its blocks marked `<!-- runs-in-tests -->` (those that need no real data)
run from the repository's folder, as a newcomer types them once `make` has installed `.venv`.

A `bash` block runs as one script and must succeed. A transcript block (`$ command` lines, each followed by what it
prints) runs each command and compares the output line by line, `...` standing for any text.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

MARK = "<!-- runs-in-tests -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.DOTALL)
ACTIVATE = REPO / ".venv" / "bin" / "activate"


def marked_blocks(text: str) -> list[tuple[str, str]]:
    return [(m["lang"], m["body"]) for m in BLOCK.finditer(text)]


def transcript(body: str) -> list[tuple[str, list[str]]]:
    """`$ command` lines, each with the lines it prints."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
    return steps


def matches(expected: str, line: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("...")), line) is not None


def test_the_readme_marks_the_blocks_a_test_runs_and_each_is_a_script_or_a_transcript():
    blocks = marked_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 2
    for lang, body in blocks:
        assert lang == "bash" or (lang == "" and body.startswith("$ ")), body
    assert matches("choose one of: deit, ... (see `extract backbones`)", "choose one of: deit, dino, sam (see `extract backbones`)")
    assert not matches("error: unknown backbone", "error: unknown dataset")


@pytest.mark.slow  # subprocesses: the installed commands, as the README runs them
@pytest.mark.skipif(not ACTIVATE.exists(), reason="needs the repository's .venv (make install)")
def test_the_readmes_marked_blocks_run_verbatim_from_the_repository(tmp_path: Path):
    env = {**os.environ, "MEDFM_OUTPUT": str(tmp_path / "outputs"), "COLUMNS": "200",
           "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    for lang, body in marked_blocks((REPO / "README.md").read_text()):
        if lang == "bash":
            proc = subprocess.run(["bash", "-e", "-c", body], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{body}\n{proc.stderr[-2000:]}"
            continue
        for command, expected in transcript(body):
            proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            said = (proc.stdout + proc.stderr).strip().splitlines()
            assert len(said) == len(expected) and all(matches(e, s) for e, s in zip(expected, said, strict=True)), (command, said)
