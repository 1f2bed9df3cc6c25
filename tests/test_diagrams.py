"""The diagrams are drawn from the running table, and the committed ones are not stale."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fsmchat.lifecycle import LIFECYCLES

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "diagrams"


def generate(out: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "fsmchat", "diagrams", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("diagrams")
    result = generate(out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("suffix", ["mmd", "dot"])
def test_committed_sources_match_the_code(fresh: Path, suffix: str) -> None:
    for lifecycle in LIFECYCLES:
        name = f"{lifecycle.name}.{suffix}"
        assert (COMMITTED / name).read_text() == (fresh / name).read_text(), (
            f"diagrams/{name} is stale: run `python -m fsmchat diagrams` and commit the result")


def test_every_row_of_every_table_is_drawn(fresh: Path) -> None:
    for lifecycle in LIFECYCLES:
        mermaid = (fresh / f"{lifecycle.name}.mmd").read_text()
        dot = (fresh / f"{lifecycle.name}.dot").read_text()
        assert f"[*] --> {lifecycle.initial}" in mermaid
        assert f"{lifecycle.final} --> [*]" in mermaid
        assert f"__start__ -> {lifecycle.initial}" in dot
        for row in lifecycle.transitions:
            for source in row.sources:
                edge = f"{source} --> {row.dest or source} : {row.trigger} / {row.action}"
                assert edge in mermaid
                dot_edge = re.search(rf"^\s*{source} -> {row.dest or source} \[label=\"(.*)\"\]",
                                     dot, re.M)
                assert dot_edge and f"{row.trigger} / {row.action}" in dot_edge.group(1)


def test_no_state_is_drawn_as_current(fresh: Path) -> None:
    dot = (fresh / "connection.dot").read_text()
    assert "darksalmon" not in dot and "peripheries=2" not in dot


@pytest.fixture
def dot_on_path(tmp_path: Path) -> str:
    """PATH with Graphviz's dot; where it is not installed, a stand-in that echoes its input.

    CI installs Graphviz, so there the real rendering is checked; on a machine without it the
    stand-in still checks fsmchat's side: the DOT source goes to ``dot -Tsvg`` and what comes
    back is written as the .svg file.
    """
    path = os.environ.get("PATH", "")
    if shutil.which("dot"):
        return path
    stand_in = tmp_path / "bin" / "dot"
    stand_in.parent.mkdir()
    stand_in.write_text(  # shell builtins only: PATH may hold nothing else
        "#!/bin/sh\nprintf '<?xml version=\"1.0\"?><svg>'\n"
        "while IFS= read -r line; do printf '%s\\n' \"$line\"; done\nprintf '</svg>'\n"
    )
    stand_in.chmod(0o755)
    return f"{stand_in.parent}{os.pathsep}{path}"


def test_svg_shows_every_state_and_trigger(tmp_path: Path, dot_on_path: str) -> None:
    out = tmp_path / "out"
    result = generate(out, "--format", "svg", path=dot_on_path)
    assert result.returncode == 0, result.stderr
    for lifecycle in LIFECYCLES:
        svg = (out / f"{lifecycle.name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
        for state in lifecycle.states:
            assert state in svg
        for row in lifecycle.transitions:
            assert f"{row.trigger} / {row.action}" in svg


def test_without_dot_the_sources_are_still_written(tmp_path: Path) -> None:
    result = generate(tmp_path, path="")
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "dot" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{lifecycle.name}.{ext}" for lifecycle in LIFECYCLES for ext in ("dot", "mmd"))


def test_asking_for_svg_without_dot_is_an_error(tmp_path: Path) -> None:
    result = generate(tmp_path, "--format", "svg", path="")
    assert result.returncode == 1
    assert "Graphviz" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_format_selects_one(tmp_path: Path) -> None:
    result = generate(tmp_path, "--format", "mermaid")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{lifecycle.name}.mmd" for lifecycle in LIFECYCLES)


def test_a_bad_format_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = generate(tmp_path, "--format", "png")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--format" in result.stderr


DESIGN = ROOT / "docs" / "design.md"


def test_the_design_document_embeds_the_current_mermaid_diagrams() -> None:
    blocks = re.findall(r"```mermaid\n(.*?)```", DESIGN.read_text(), re.S)
    for lifecycle in LIFECYCLES:
        assert (COMMITTED / f"{lifecycle.name}.mmd").read_text() in blocks, lifecycle.name


def test_the_design_document_explains_every_state_and_trigger() -> None:
    design = DESIGN.read_text()
    for lifecycle in LIFECYCLES:
        for state in lifecycle.states:
            assert re.search(rf"^\| `{state}` \|", design, re.M), state
        for row in lifecycle.transitions:
            assert re.search(rf"^\| `{row.trigger}` \|", design, re.M), row.trigger


def test_the_design_document_explains_the_internal_label(fresh: Path) -> None:
    """GraphMachine marks internal rows ``[internal]``; the reader is told what that means."""
    assert "[internal]" in (fresh / "connection.dot").read_text()
    design = DESIGN.read_text()
    assert re.search(r"`\[internal\]`[^.]*state (stays|does not change)", design), (
        "docs/design.md should say what [internal] means beside the diagrams")
