"""Generated regions of the documentation, drawn from the catalogues the code runs.

A Markdown file marks a region with a line ``<!-- generated: NAME -->`` and a line
``<!-- end generated -->``; ``fsmchat docs`` replaces what lies between with what NAME renders,
and ``fsmchat docs --check`` says which files would change. The names:

- ``options``: the server's command line, from its argparse parser (flag, metavar, default, help);
- ``events``: ``events.CATALOGUE``; ``metrics``: ``metrics.CATALOGUE``;
- ``diagram L``, ``states L``, ``triggers L``, ``transitions L`` for a lifecycle ``L`` of
  ``lifecycle.LIFECYCLES``: its Mermaid drawing, what each state and trigger means, and each row
  of its table with the row's ``doc``.

Rules it keeps:
- Text outside the regions is never touched, and a region holds nothing but generated text, so
  the prose around a table is written by people and the table by the code.
- Rendering is deterministic: ``--check`` compares bytes, and a fresh checkout is never stale.
- A marker it cannot read (an unknown name, an end without a start, a start without an end) is
  an error naming the file and line, never a silent skip.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fsmchat import diagrams
from fsmchat.lifecycle import LIFECYCLES, Documented, Lifecycle
from fsmchat.ops.events import CATALOGUE as EVENTS
from fsmchat.ops.metrics import CATALOGUE as METRICS
from fsmchat.reasons import ERRNO_DOC, Reason

START = re.compile(r"^<!-- generated: (?P<name>[\w -]+?) -->$")
END = "<!-- end generated -->"
COMMAND = "python -m fsmchat docs"


class DocsError(Exception):
    """A file whose markers cannot be read: one line, naming the file and the line."""


_AS_CODE = re.compile(
    r"(?<![\w`.-])(--[a-z][a-z0-9-]*|(?:redis|http)://[^\s),;]+|"
    + "|".join(re.escape(spec.name) for spec in EVENTS) + r")(?![\w-])")
"""What a cell shows as code: options, URLs and event names."""


def _cell(text: str) -> str:
    """Table-safe text (no ``|``, no HTML), with options, URLs and event names as code."""
    text = text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return _AS_CODE.sub(r"`\1`", text)


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _code(names: Iterable[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _meaning(member: str) -> str:
    if not isinstance(member, Documented) or not member.doc:
        raise DocsError(f"{member!r} says nothing of what it means (fsmchat/lifecycle.py)")
    return member.doc


# --- options -------------------------------------------------------------------------------

_DEFAULT = re.compile(r"(?:\s*\(|; )default: (?P<value>[^()]*(?:\([^()]*\)[^()]*)*)\)")
"""``(default: X)``, or ``; default: X)`` closing a longer parenthesis, in a help text."""


def _invocation(action: argparse.Action) -> str:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    if action.metavar is not None:
        metavar = str(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(str(choice) for choice in action.choices) + "}"
    else:
        metavar = action.dest.upper()
    return ", ".join(f"`{flag} {metavar}`" for flag in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> tuple[str, str]:
    """(default, meaning) from the help text as ``--help`` expands it."""
    params = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    params["prog"] = parser.prog
    if isinstance(action.default, float) and action.default.is_integer():
        params["default"] = int(action.default)  # 5, not 5.0
    if action.choices is not None:
        params["choices"] = ", ".join(str(choice) for choice in action.choices)
    text = (action.help or "") % params
    found = _DEFAULT.search(text)
    if found:
        default = found["value"]
        text = text[:found.start()] + (")" if found[0].startswith(";") else "") + text[found.end():]
        plain = default == str(params.get("default")) or re.fullmatch(r"[\d.]+[KMG]?", default)
        return (f"`{default}`" if plain else _cell(default)), text
    if action.default in (None, False, [], argparse.SUPPRESS):
        return ("off" if action.default is False else ""), text
    return f"`{action.default}`", text


def options(parser: argparse.ArgumentParser) -> str:
    parts: list[str] = []
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if action.option_strings]
        if not actions:
            continue
        if parts:
            title = (group.title or "")[:1].upper() + (group.title or "")[1:]
            parts.append(f"**{_cell(title)}.** {_cell(group.description or '')}".rstrip() + "\n")
        rows = []
        for action in actions:
            default, meaning = _help(parser, action)
            rows.append((_invocation(action), default, _cell(meaning)))
        parts.append(_table(("option", "default", "meaning"), rows))
    return "\n".join(parts)


# --- events and metrics --------------------------------------------------------------------

def events() -> str:
    return _table(("event", "level", "fields", "meaning"),
                  ((f"`{spec.name}`", spec.level, _code(spec.fields), _cell(spec.doc))
                   for spec in EVENTS))


def metrics() -> str:
    return _table(("metric", "type", "label", "meaning"),
                  ((f"`{spec.name}{'_total' if spec.kind == 'counter' else ''}`", spec.kind,
                    f"`{spec.label}`" if spec.label else "", _cell(spec.help))
                   for spec in METRICS))


def reasons() -> str:
    return _table(("reason", "what it means"),
                  [*((f"`{reason}`", _cell(reason.doc)) for reason in Reason),
                   ("*errno name*", _cell(ERRNO_DOC))])


# --- lifecycles ----------------------------------------------------------------------------

def diagram(lifecycle: Lifecycle) -> str:
    return f"```mermaid\n{diagrams.mermaid(lifecycle)}```\n"


def states(lifecycle: Lifecycle) -> str:
    return _table(("state", "what it means"),
                  ((f"`{state}`", _cell(_meaning(state))) for state in lifecycle.states))


def triggers(lifecycle: Lifecycle) -> str:
    seen = dict.fromkeys(row.trigger for row in lifecycle.transitions)
    return _table(("trigger", "fired when"),
                  ((f"`{trigger}`", _cell(_meaning(trigger))) for trigger in seen))


def transitions(lifecycle: Lifecycle) -> str:
    def move(sources: tuple[str, ...], dest: str | None) -> str:
        return ", ".join(sources) + (" (stays)" if dest is None else f" → {dest}")

    return _table(("trigger", "from → to", "action", "what it does"),
                  ((f"`{row.trigger}`", move(row.sources, row.dest),
                    f"`{row.action}`" if row.action else "", _cell(row.doc))
                   for row in lifecycle.transitions))


def regions(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every region name there is, rendered."""
    rendered = {"options": options(parser), "events": events(), "metrics": metrics(),
                "reasons": reasons()}
    kinds: dict[str, Callable[[Lifecycle], str]] = {
        "diagram": diagram, "states": states, "triggers": triggers, "transitions": transitions}
    for lifecycle in LIFECYCLES:
        for kind, render in kinds.items():
            rendered[f"{kind} {lifecycle.name}"] = render(lifecycle)
    return rendered


# --- files ---------------------------------------------------------------------------------

def rewrite(text: str, rendered: Mapping[str, str], where: str) -> str:
    """``text`` with every region's content replaced by what its name renders."""
    out: list[str] = []
    opened: tuple[str, int] | None = None
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        bare = line.rstrip("\n")
        start = START.match(bare)
        if opened is None:
            out.append(line)
            if start:
                name = start["name"]
                if name not in rendered:
                    raise DocsError(f"{where}:{number}: unknown generated region {name!r}")
                opened = (name, number)
            elif bare == END:
                raise DocsError(f"{where}:{number}: {END} without a generated region before it")
        elif start:
            raise DocsError(f"{where}:{number}: a generated region starts inside another "
                            f"(line {opened[1]})")
        elif bare == END:
            out.append(f"\n{rendered[opened[0]]}\n{line}")
            opened = None
    if opened is not None:
        raise DocsError(f"{where}:{opened[1]}: generated region {opened[0]!r} has no {END}")
    return "".join(out)


def names(text: str) -> list[str]:
    """The region names a file uses, in order."""
    return [found["name"] for line in text.splitlines() if (found := START.match(line))]


def update(paths: Iterable[Path], rendered: Mapping[str, str], check: bool) -> list[Path]:
    """The files whose regions are stale; rewritten unless ``check``."""
    stale: list[Path] = []
    for path in paths:
        text = path.read_text()
        fresh = rewrite(text, rendered, str(path))
        if fresh != text:
            stale.append(path)
            if not check:
                path.write_text(fresh)
    return stale
