"""What a suite prints and keeps: aligned tables, and one dated JSON file per run.

A run's file is ``results/<suite>-<UTC date-time>.json``: the suite, the date, the command
line, the machine (CPU model, cores, Python, load), the fsmchat measured (its commit, whether
it is this checkout: see ``harness.checkout``), the tables as printed (``Table``: a title,
columns, rows of text cells), notes, and the suite's own figures in full. ``bench/summary.py``
reads the latest file of each suite into ``results/SUMMARY.md``; nothing else is written by
hand.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.checkout import ROOT, current, git
from harness.procfs import cpu_model

RESULTS = ROOT / "bench" / "results"


@dataclass
class Table:
    title: str
    columns: list[str]  # the first one heads the labels
    rows: list[list[str]] = field(default_factory=list)

    def add(self, label: str, *cells: str) -> None:
        self.rows.append([label, *cells])

    def text(self) -> str:
        width = [max(len(r[i]) for r in [self.columns, *self.rows] if i < len(r))
                 for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        for row in [self.columns, *self.rows]:
            cells = [f"{c:<{width[0]}}" if i == 0 else f"{c:>{width[i] + 2}}"
                     for i, c in enumerate(row)]
            lines.append("".join(cells).rstrip())
        return "\n".join(lines)

    def markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") or " " for c in cells) + " |"

        out = [line(self.columns), "|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1))
               + "|"]
        def label(text: str) -> str:  # a row under a heading row keeps its indent
            return "&emsp;" + text.lstrip() if text.startswith("  ") else text

        out += [line([label(r[0]), *r[1:]] + [""] * (len(self.columns) - len(r)))
                for r in self.rows]
        return "\n".join(out)


def cell(value: float | None, fmt: str) -> str:
    """A figure as text; "n/a" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def machine() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "loadavg": os.getloadavg()}


def command(script: str, argv: list[str]) -> str:
    return " ".join(["python", f"bench/{script}", *argv])


def write(suite: str, out: Path, *, argv: list[str], tables: list[Table], notes: list[str],
          figures: dict[str, Any], started: dt.datetime, seconds: float) -> Path:
    """The run's dated JSON file in ``out``; its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}-{started:%Y-%m-%dT%H%M%SZ}.json"
    doc = {
        "suite": suite,
        "date": started.isoformat(timespec="seconds"),
        "command": command(f"{suite}.py", argv),
        "seconds": round(seconds, 1),
        "machine": machine(),
        "fsmchat": current().facts(),
        "bench": {"commit": git(ROOT, "rev-parse", "HEAD"),
                  "dirty": git(ROOT, "status", "--porcelain", "--", "bench").splitlines()},
        "tables": [asdict(t) for t in tables],
        "notes": notes,
        "figures": figures,
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def say(msg: str) -> None:
    """Progress, on stderr: stdout has the tables."""
    print(msg, file=sys.stderr, flush=True)
