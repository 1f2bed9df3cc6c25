"""Structural rules: one select() call, no threads / async / other pollers in the package."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ServerProcess, recv_exactly

PACKAGE = Path(__file__).resolve().parent.parent / "fsmchat"

FORBIDDEN_MODULES = (
    "threading",
    "_thread",
    "asyncio",
    "selectors",
    "concurrent.futures",
    "multiprocessing",
)
FORBIDDEN_POLLERS = ("poll", "epoll", "kqueue", "devpoll")


@dataclass
class Findings:
    select_calls: list[str] = field(default_factory=list)
    forbidden_imports: list[str] = field(default_factory=list)
    pollers: list[str] = field(default_factory=list)


def forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_MODULES)


def scan_imports(tree: ast.Module, name: str, findings: Findings) -> tuple[set[str], set[str]]:
    """Record forbidden imports; return names bound to the select module / select.select."""
    select_modules: set[str] = set()
    select_functions: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if forbidden(alias.name):
                    findings.forbidden_imports.append(f"{name}:{node.lineno} import {alias.name}")
                if alias.name == "select":
                    select_modules.add(alias.asname or "select")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                where = f"{name}:{node.lineno} from {node.module} import {alias.name}"
                if forbidden(node.module) or forbidden(f"{node.module}.{alias.name}"):
                    findings.forbidden_imports.append(where)
                if node.module == "select" and alias.name == "select":
                    select_functions.add(alias.asname or "select")
                elif node.module == "select" and alias.name in (*FORBIDDEN_POLLERS, "*"):
                    findings.pollers.append(where)
    return select_modules, select_functions


def dynamic_import(node: ast.Call) -> str | None:
    """The module named in ``__import__("x")`` / ``importlib.import_module("x")``."""
    func = node.func
    callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if callee not in ("__import__", "import_module") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def is_select_call(node: ast.Call, modules: set[str], functions: set[str]) -> bool:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in functions
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "select"
        and isinstance(func.value, ast.Name)
        and func.value.id in modules
    )


def scan_source(source: str, name: str, findings: Findings) -> None:
    tree = ast.parse(source, filename=name)
    modules, functions = scan_imports(tree, name, findings)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if is_select_call(node, modules, functions):
                findings.select_calls.append(f"{name}:{node.lineno}")
            module = dynamic_import(node)
            if module is not None and forbidden(module):
                findings.forbidden_imports.append(f"{name}:{node.lineno} import {module!r}")
        elif isinstance(node, ast.Attribute):
            on_select = isinstance(node.value, ast.Name) and node.value.id in modules
            if (on_select and node.attr in FORBIDDEN_POLLERS) or node.attr in (
                "epoll",
                "kqueue",
                "devpoll",
            ):
                findings.pollers.append(f"{name}:{node.lineno} .{node.attr}")


def scan_package(root: Path) -> tuple[Findings, list[Path]]:
    findings = Findings()
    files = sorted(root.rglob("*.py"))
    for path in files:
        scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(root.parent)), findings)
    return findings, files


@pytest.fixture(scope="module")
def package_findings() -> Findings:
    findings, files = scan_package(PACKAGE)
    assert len(files) >= 2, f"expected the fsmchat package under {PACKAGE}"
    return findings


def test_select_is_called_exactly_once_in_the_package(package_findings: Findings) -> None:
    assert len(package_findings.select_calls) == 1, package_findings.select_calls


def test_no_threads_async_or_process_pools_are_imported(package_findings: Findings) -> None:
    assert package_findings.forbidden_imports == []


def test_no_other_poller_is_used(package_findings: Findings) -> None:
    assert package_findings.pollers == []


# The checker itself must be able to fail: feed it known-bad sources.


@pytest.mark.parametrize(
    ("source", "calls"),
    [
        ("import select\nselect.select([], [], [])\n", 1),
        ("import select as s\ns.select([], [], [], 1)\ns.select([], [], [])\n", 2),
        ("from select import select as sel\nsel([], [], [])\n", 1),
        ("import select\nx = select.error\n", 0),
    ],
)
def test_checker_counts_select_calls(source: str, calls: int) -> None:
    findings = Findings()
    scan_source(source, "sample.py", findings)
    assert len(findings.select_calls) == calls


@pytest.mark.parametrize(
    "source",
    [
        "import threading\n",
        "import concurrent.futures\n",
        "from concurrent import futures\n",
        "from concurrent.futures import ThreadPoolExecutor\n",
        "import asyncio as aio\n",
        "from multiprocessing import Pool\n",
        "import _thread\n",
        "import selectors\n",
        "import importlib\nimportlib.import_module('threading')\n",
    ],
)
def test_checker_flags_forbidden_imports(source: str) -> None:
    findings = Findings()
    scan_source(source, "sample.py", findings)
    assert findings.forbidden_imports


@pytest.mark.parametrize(
    "source",
    [
        "import select\np = select.poll()\n",
        "import select as s\ne = s.epoll()\n",
        "from select import kqueue\n",
        "import select\nd = select.devpoll()\n",
    ],
)
def test_checker_flags_other_pollers(source: str) -> None:
    findings = Findings()
    scan_source(source, "sample.py", findings)
    assert findings.pollers


def test_running_server_has_a_single_thread(server: ServerProcess) -> None:
    tasks = Path(f"/proc/{server.pid}/task")
    a, b = server.connect_many(2)
    a.sock.sendall(b"thread check")
    assert recv_exactly(b.sock, 12) == b"thread check"
    assert os.listdir(tasks) == [str(server.pid)]
