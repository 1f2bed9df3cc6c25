"""Which fsmchat the bench measures: this checkout's, or the package of another one (A/B).

``--fsmchat DIR`` (every suite) points at another checkout, typically a git worktree of an
older commit: every server the bench starts is then ``python -m fsmchat`` run in DIR with DIR
first on PYTHONPATH, so DIR's package is the one imported (the editable install of this
checkout comes after sys.path). The harness, the load and the peers stay this checkout's, so
before and after are measured by the same bench. ``CHECKOUT`` is the one in use.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # this checkout: the bench's own
PY = sys.executable


class CheckoutError(Exception):
    """DIR is not a checkout with an fsmchat package."""


@dataclass(frozen=True)
class Checkout:
    root: Path

    def argv(self, *args: str) -> list[str]:
        """The command of an fsmchat server of this checkout."""
        return [PY, "-m", "fsmchat", *args]

    def env(self) -> dict[str, str]:
        """The environment its processes run with: its package first on the path."""
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": str(self.root) + (os.pathsep + path if path else "")}

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """One short command of this checkout's Python, as its servers run: in its root."""
        return subprocess.run([PY, *args], check=False, capture_output=True, text=True,
                              cwd=self.root, env=self.env(), timeout=timeout)

    def digest(self) -> str:
        """A digest of the package's sources: every run of a bench must measure one build."""
        digest = hashlib.sha256()
        for path in sorted((self.root / "fsmchat").rglob("*.py")):
            rel = path.relative_to(self.root).as_posix()
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()[:16]

    def facts(self) -> dict[str, object]:
        """What a result records of the fsmchat it measured."""
        where = self.run("-c", "import fsmchat; print(fsmchat.__file__)").stdout.strip()
        return {"root": str(self.root), "this_checkout": self.root == ROOT,
                "commit": git(self.root, "rev-parse", "HEAD"),
                "describe": git(self.root, "log", "-1", "--format=%h %s"),
                "dirty": git(self.root, "status", "--porcelain", "--", "fsmchat").splitlines(),
                "imported_from": where, "sources": self.digest()}


def git(root: Path, *args: str) -> str:
    """What a git command prints in ``root``, or "" when it cannot run."""
    try:
        done = subprocess.run(["git", *args], check=False, capture_output=True, text=True,
                              cwd=root, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


CHECKOUT = Checkout(ROOT)


def use(directory: Path) -> Checkout:
    """Measure the fsmchat package of ``directory`` from now on."""
    global CHECKOUT  # noqa: PLW0603 - one checkout per bench process, chosen at its start
    root = directory.resolve()
    if not (root / "fsmchat" / "__init__.py").is_file():
        raise CheckoutError(f"--fsmchat {directory}: no fsmchat package there "
                            "(fsmchat/__init__.py)")
    CHECKOUT = Checkout(root)
    where = CHECKOUT.run("-c", "import fsmchat; print(fsmchat.__file__)").stdout.strip()
    if not Path(where or "/").resolve().is_relative_to(root):
        raise CheckoutError(f"--fsmchat {directory}: python imports fsmchat from {where!r}, "
                            "not from there")
    return CHECKOUT


def current() -> Checkout:
    """The checkout in use (read it through this: ``use`` may have replaced it)."""
    return CHECKOUT
