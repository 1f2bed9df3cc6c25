"""The documentation cannot fall behind the code.

Every event the package emits is in ``events.CATALOGUE`` with the level it is emitted at, every
catalogued event is in README's catalogue, and every option ``--help`` lists is in README.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fsmchat.cli import build_parser
from fsmchat.events import CATALOGUE
from fsmchat.metrics import CATALOGUE as METRICS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
LEVELS = {"debug", "info", "warning", "error", "critical"}


def emitted() -> set[tuple[str, str]]:
    """(event, level) for every ``<logger>.<level>("event", ...)`` call in the package."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / "fsmchat").glob("*.py"):
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


def test_readme_catalogue_has_every_event_with_level_and_fields() -> None:
    for spec in CATALOGUE:
        row = re.search(rf"^\| `{re.escape(spec.name)}` \| {spec.level} \|(.*)$", README, re.M)
        assert row, f"{spec.name} ({spec.level}) missing from README's event catalogue"
        for field in spec.fields:
            assert f"`{field}`" in row.group(1), f"{spec.name}: field {field} not in README"


def test_readme_explains_every_option() -> None:
    options = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    ]
    assert "--port" in options
    for option in options:
        assert f"`{option}" in README, f"{option} missing from README"


def test_readme_metric_table_matches_the_catalogue() -> None:
    rows = dict(re.findall(r"^\| `(fsmchat_\w+)` \| (counter|gauge) \|", README, re.M))
    exported = {
        spec.name + ("_total" if spec.kind == "counter" else ""): spec.kind
        for spec in METRICS
    }
    assert rows == exported
