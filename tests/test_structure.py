"""Structural rules: one select() call, no threads / async / other pollers in the package.

The rules cover every module of the package but the terminal client, ``fsmchat/connect.py``
(``CLIENT``), which runs on asyncio for prompt_toolkit: the server never imports it (only
``cli`` does, inside the function that runs ``fsmchat connect``), and importing the server's
entry path loads neither it, prompt_toolkit, nor asyncio on fsmchat's behalf.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ServerProcess, recv_exactly

PACKAGE = Path(__file__).resolve().parent.parent / "fsmchat"
#: The one module the rules do not cover: the terminal client (asyncio, prompt_toolkit).
CLIENT = PACKAGE / "connect.py"
CLIENT_MODULE = "fsmchat.connect"
#: The one module that may import the client, and only inside a function.
CLI = PACKAGE / "cli.py"

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


def scan_package(root: Path, skip: tuple[Path, ...] = ()) -> tuple[Findings, list[Path]]:
    findings = Findings()
    files = sorted(path for path in root.rglob("*.py") if path not in skip)
    for path in files:
        scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(root.parent)), findings)
    return findings, files


@pytest.fixture(scope="module")
def package_findings() -> Findings:
    findings, files = scan_package(PACKAGE, skip=(CLIENT,))
    assert len(files) >= 2, f"expected the fsmchat package under {PACKAGE}"
    return findings


def test_select_is_called_exactly_once_in_the_package(package_findings: Findings) -> None:
    assert len(package_findings.select_calls) == 1, package_findings.select_calls


def test_no_threads_async_or_process_pools_are_imported(package_findings: Findings) -> None:
    assert package_findings.forbidden_imports == []


def test_no_other_poller_is_used(package_findings: Findings) -> None:
    assert package_findings.pollers == []


def test_the_client_is_the_one_exception_and_needs_it() -> None:
    """Should the client stop needing asyncio, the exception goes: it covers nothing else."""
    findings = Findings()
    scan_source(CLIENT.read_text(encoding="utf-8"), "fsmchat/connect.py", findings)
    assert any("asyncio" in where for where in findings.forbidden_imports), findings


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def client_imports(tree: ast.Module, module: str, is_package: bool) -> list[ast.stmt]:
    """The import statements of ``module`` that name the client module (absolute or relative)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        if any(name == CLIENT_MODULE or name.startswith(CLIENT_MODULE + ".") for name in names):
            found.append(node)
    return found


def top_level_statements(tree: ast.Module) -> set[ast.stmt]:
    """Statements that run on import: the module's body and what its ifs and trys hold."""
    out: set[ast.stmt] = set()
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        out.add(node)
        if isinstance(node, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody", "handlers"):
                todo += getattr(node, block, [])
        if isinstance(node, ast.ExceptHandler):
            todo += node.body
    return out


def test_no_server_module_imports_the_client() -> None:
    offenders: list[str] = []
    lazy_in_cli = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == CLIENT:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = client_imports(tree, module_name(path), path.name == "__init__.py")
        at_import = top_level_statements(tree)
        for node in found:
            if path == CLI and node not in at_import:
                lazy_in_cli += 1
            else:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []
    assert lazy_in_cli == 1, "cli imports the client inside the function that runs it"


@pytest.mark.parametrize(
    ("source", "module", "count"),
    [
        ("import fsmchat.connect\n", "fsmchat.hub", 1),
        ("from fsmchat import connect\n", "fsmchat.hub", 1),
        ("from fsmchat.connect import run\n", "fsmchat.hub", 1),
        ("from . import connect\n", "fsmchat.hub", 1),
        ("from .. import connect\n", "fsmchat.net.loop", 1),
        ("from fsmchat import connection\n", "fsmchat.hub", 0),
        ("from .net import connect\n", "fsmchat.hub", 0),
    ],
)
def test_checker_finds_imports_of_the_client(source: str, module: str, count: int) -> None:
    assert len(client_imports(ast.parse(source), module, is_package=False)) == count


#: Run in a fresh interpreter: which module imported each watched one first.
IMPORT_SPY = """
import json, sys
WATCHED = ("asyncio", "prompt_toolkit", "fsmchat.connect")
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and name not in seen:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            seen[name] = frame.f_globals.get("__name__") if frame is not None else None
        return None
sys.meta_path.insert(0, Spy())
for module in sys.argv[1:]:
    __import__(module)
print(json.dumps(seen))
"""


def first_importers(*modules: str) -> dict[str, str | None]:
    result = subprocess.run([sys.executable, "-c", IMPORT_SPY, *modules], capture_output=True,
                            text=True, timeout=60, check=True)
    seen: dict[str, str | None] = json.loads(result.stdout)
    return seen


def test_the_server_entry_path_loads_no_client_and_no_asyncio_of_its_own() -> None:
    """What ``python -m fsmchat`` imports (cli, and the server through it): not the client, not
    prompt_toolkit; asyncio only on behalf of a library (transitions' extensions import it, and
    structlog), never of fsmchat's own."""
    seen = first_importers("fsmchat.cli", "fsmchat.server")
    assert "fsmchat.connect" not in seen and "prompt_toolkit" not in seen, seen
    importer = seen.get("asyncio")
    assert importer is None or not importer.startswith("fsmchat"), seen


def test_the_import_spy_sees_the_client_import_asyncio() -> None:
    """The check above can fail: importing the client is seen, and whom it brings in."""
    seen = first_importers("fsmchat.connect")
    assert seen["asyncio"] == seen["prompt_toolkit"] == "fsmchat.connect", seen


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
