"""Lifecycle diagrams drawn from ``lifecycle.TRANSITIONS`` (in progress)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("fsmchat diagrams: not yet available", file=sys.stderr)
    return 1
