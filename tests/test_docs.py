"""The documentation cannot fall behind the code.

Every event the package emits is in ``events.CATALOGUE`` with the level it is emitted at; the
generated regions of ``docs/`` are what ``fsmchat docs`` prints from the catalogues today; every
catalogued event, option and metric is in the operators' guide; every relative link of README
and ``docs/`` resolves; the systemd unit runs a command line the server accepts, and gives the
stop the time it takes.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fsmchat import docs
from fsmchat.cli import build_parser
from fsmchat.lifecycle import LIFECYCLES
from fsmchat.ops.events import CATALOGUE
from fsmchat.ops.metrics import CATALOGUE as METRICS
from fsmchat.options import MAX_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPERATING = (DOCS / "operating.md").read_text()
LEVELS = {"debug", "info", "warning", "error", "critical"}

def emitted() -> set[tuple[str, str]]:
    """(event, level) for every ``<logger>.<level>("event", ...)`` call in the package."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / "fsmchat").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "parser")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.add((node.args[0].value, node.func.attr))
    return found


def test_every_emitted_event_is_catalogued_at_its_level() -> None:
    catalogue = {(spec.name, spec.level) for spec in CATALOGUE}
    calls = emitted()
    assert calls, "the scan found no log calls at all"
    assert calls <= catalogue, calls - catalogue


def test_the_catalogue_lists_nothing_the_code_never_emits() -> None:
    names = {name for name, _ in emitted()}
    assert {spec.name for spec in CATALOGUE} <= names


# --- the generated regions -----------------------------------------------------------------

def run_docs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsmchat", "docs", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)


def test_the_generated_docs_are_current() -> None:
    result = run_docs("--check")
    assert result.returncode == 0, (
        f"{result.stderr.strip()}\nrun `{docs.COMMAND}` and commit the result")
    assert result.stderr == ""


def test_every_region_is_in_the_docs_once() -> None:
    used = [name for path in sorted(DOCS.glob("*.md")) for name in docs.names(path.read_text())]
    assert sorted(used) == sorted(docs.regions(build_parser())), (
        "each generated region belongs in docs/ exactly once")


def stale_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "fresh.md").write_text((DOCS / "design.md").read_text())
    stale = (DOCS / "operating.md").read_text().replace("| `--port PORT` |", "| `--port P` |")
    (folder / "stale.md").write_text(stale)
    return folder


def test_check_names_the_stale_file_and_the_command(tmp_path: Path) -> None:
    folder = stale_copy(tmp_path)
    before = (folder / "stale.md").read_text()
    result = run_docs("--check", "--dir", str(folder))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "stale.md" in result.stderr and "fresh.md" not in result.stderr
    assert docs.COMMAND in result.stderr and "Traceback" not in result.stderr
    assert (folder / "stale.md").read_text() == before, "--check changed a file"


def test_docs_rewrites_only_the_regions(tmp_path: Path) -> None:
    folder = stale_copy(tmp_path)
    result = run_docs("--dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(folder / "stale.md")]
    assert (folder / "stale.md").read_text() == OPERATING
    assert run_docs("--check", "--dir", str(folder)).returncode == 0


@pytest.mark.parametrize(("text", "complaint"), [
    ("<!-- generated: nothing -->\n<!-- end generated -->\n", "unknown generated region"),
    ("<!-- generated: events -->\n| stale |\n", "has no"),
    ("text\n<!-- end generated -->\n", "without a generated region"),
    ("<!-- generated: events -->\n<!-- generated: metrics -->\n<!-- end generated -->\n",
     "inside another"),
])
def test_a_marker_it_cannot_read_is_a_one_line_error(tmp_path: Path, text: str,
                                                      complaint: str) -> None:
    (tmp_path / "bad.md").write_text(text)
    result = run_docs("--dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and complaint in result.stderr, result.stderr
    assert "bad.md:" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "bad.md").read_text() == text


def test_a_folder_without_markdown_is_an_error(tmp_path: Path) -> None:
    result = run_docs("--dir", str(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert str(tmp_path) in result.stderr


# --- what the operators' guide must hold (once README's checks) ------------------------------

def test_operating_catalogue_has_every_event_with_level_and_fields() -> None:
    for spec in CATALOGUE:
        row = re.search(rf"^\| `{re.escape(spec.name)}` \| {spec.level} \|(.*)$", OPERATING, re.M)
        assert row, f"{spec.name} ({spec.level}) missing from docs/operating.md's event catalogue"
        for field in spec.fields:
            assert f"`{field}`" in row.group(1), f"{spec.name}: field {field} not in the docs"


def test_operating_explains_every_option() -> None:
    options = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    ]
    assert "--port" in options
    for option in options:
        assert f"`{option}" in OPERATING, f"{option} missing from docs/operating.md"


def test_operating_metric_table_matches_the_catalogue() -> None:
    rows = dict(re.findall(r"^\| `(fsmchat_\w+)` \| (counter|gauge) \|", OPERATING, re.M))
    exported = {
        spec.name + ("_total" if spec.kind == "counter" else ""): spec.kind
        for spec in METRICS
    }
    assert rows == exported


def test_every_row_state_and_trigger_says_what_it_means_in_the_design_document() -> None:
    plain = (DOCS / "design.md").read_text().replace("`", "").replace("&lt;", "<")
    lines = plain.replace("&gt;", ">").replace("\\|", "|").splitlines()
    for lifecycle in LIFECYCLES:
        for row in lifecycle.transitions:
            assert any(line.startswith(f"| {row.trigger} |") and row.doc in line
                       for line in lines), f"{lifecycle.name}: the row doc {row.doc!r}"
        for member in (*lifecycle.states, *(row.trigger for row in lifecycle.transitions)):
            meaning = getattr(member, "doc", "")
            assert meaning and any(line.startswith(f"| {member} |") and meaning in line
                                   for line in lines), f"{lifecycle.name}: {member}"


# --- README and links ----------------------------------------------------------------------

def test_readme_keeps_the_test_command_where_ci_reads_it() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("<!-- test-command"))
    assert lines[marker + 1] == "```sh"
    assert "pytest" in lines[marker + 2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command" in ci and "README.md" in ci


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation gone, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(found) for found in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        for target in links(page):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            where = (page.parent / file).resolve() if file else page
            name = where.relative_to(ROOT).as_posix() if where.is_relative_to(ROOT) else str(where)
            checked += 1
            assert where.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
            if anchor:
                assert where.suffix == ".md", f"{page.relative_to(ROOT)}: {target}: not Markdown"
                assert anchor in anchors(where), (
                    f"{page.relative_to(ROOT)}: {target}: no such heading in {name}")
    assert checked > 20, "the scan found hardly any links"


# --- the systemd unit ----------------------------------------------------------------------

def test_the_systemd_unit_runs_what_the_server_accepts() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DOCS / "fsmchat.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert os.path.basename(argv[0]) == "fsmchat"
    args = build_parser().parse_args(argv[1:])
    assert float(service["TimeoutStopSec"]) > args.drain_timeout + 1, (
        "a stop takes --drain-timeout plus one second for the last events")
    assert args.drain_timeout <= MAX_SECONDS
    assert service["KillSignal"] == "SIGTERM" and service["LimitNOFILE"] == "1024"
    families = set(service["RestrictAddressFamilies"].split())
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= families, "AF_UNIX: the signal socket pair"
