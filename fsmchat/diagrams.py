"""Lifecycle diagrams, drawn from the very tables the server runs.

``fsmchat diagrams`` writes, for every machine in ``lifecycle.LIFECYCLES``:

- ``<name>.mmd``: Mermaid ``stateDiagram-v2`` source. GitHub and many editors render it, and it
  needs no system binary;
- ``<name>.dot``: Graphviz source, from ``transitions``' GraphMachine fed the same table;
- ``<name>.svg``: that source rendered by Graphviz's ``dot``, when it is installed.

The diagrams are static: they show the table (initial state, every trigger with the action it
runs, the final state), never a live model's current state. The committed files in
``diagrams/`` are checked against a fresh rendering by the tests, so they cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import graphviz
from transitions.extensions import GraphMachine

from fsmchat.lifecycle import Lifecycle, Transition

FORMATS = {"mermaid": "mmd", "dot": "dot", "svg": "svg"}
LAYOUT = {"rankdir": "TB", "nodesep": "0.8", "ranksep": "0.6"}
"""Top to bottom with room between nodes: self-loop labels stay clear of the other edges."""


def label(row: Transition) -> str:
    return f"{row.trigger} / {row.action}" if row.action else str(row.trigger)


def mermaid(lifecycle: Lifecycle) -> str:
    lines = ["stateDiagram-v2", f"    [*] --> {lifecycle.initial}"]
    for row in lifecycle.transitions:
        for source in row.sources:
            lines.append(f"    {source} --> {row.dest or source} : {label(row)}")
    lines.append(f"    {lifecycle.final} --> [*]")
    return "\n".join(lines) + "\n"


def dot(lifecycle: Lifecycle) -> str:
    """Graphviz source from ``transitions``' GraphMachine.

    The graph is drawn from the machine itself rather than from a model, so no state carries
    the "current state" style; start and end points are added as Graphviz point nodes.
    """
    config: dict[str, Any] = lifecycle.machine_config()
    for spec, row in zip(config["transitions"], lifecycle.transitions, strict=True):
        spec["label"] = label(row)
    machine = GraphMachine(model=None, graph_engine="graphviz", title=lifecycle.name,
                           show_conditions=True, **config)
    machine.machine_attributes = {**machine.machine_attributes, **LAYOUT}
    graph: graphviz.Digraph = machine.graph_cls(machine).get_graph(
        title=f"fsmchat {lifecycle.name} lifecycle")
    graph.node("__start__", label="", shape="circle", style="filled", fillcolor="black",
               width="0.2")
    graph.node("__end__", label="", shape="doublecircle", style="filled", fillcolor="black",
               width="0.15")
    graph.edge("__start__", str(lifecycle.initial))
    graph.edge(str(lifecycle.final), "__end__")
    source: str = graph.source
    return source


def svg(dot_source: str) -> bytes:
    rendered: bytes = graphviz.Source(dot_source).pipe(format="svg")
    return rendered


def write(lifecycle: Lifecycle, out: Path, formats: list[str]) -> list[Path]:
    written: list[Path] = []
    dot_source = dot(lifecycle) if {"dot", "svg"} & set(formats) else ""
    for fmt in formats:
        path = out / f"{lifecycle.name}.{FORMATS[fmt]}"
        if fmt == "mermaid":
            path.write_text(mermaid(lifecycle))
        elif fmt == "dot":
            path.write_text(dot_source)
        else:
            path.write_bytes(svg(dot_source))
        written.append(path)
    return written
