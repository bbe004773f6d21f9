"""The rooms of the code: the running processes never import a command module.

The watcher, the engines and ``fixative run`` stay up for weeks; a command
module (``status``, ``doctor``...) is free to grow heavy imports and
terminal-only behaviour, and must never be dragged into them (the watcher's
no-torch rule is in tests/test_watcher.py). Checked on the
source, every ``import`` in every function included, because the processes
import lazily: a test that only imported the module would miss a command
reached from inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DAEMON = REPO / "daemon"
RUNNING = ("watcher", "worker", "supervisor", "store")  # what `fixative run`, `watch` and `engine` are made of
COMMANDS = {"cli", "status", "doctor", "protect_command", "check_command", "demo"}


def daemon_imports(source: str) -> set[str]:
    """The ``fixative.daemon`` modules that ``source`` imports anywhere in it, by their short names."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "fixative.daemon":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("fixative.daemon."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[2] for alias in node.names if alias.name.startswith("fixative.daemon.")}
    return found


def reachable(roots: tuple[str, ...]) -> dict[str, str]:
    """Every daemon module that ``roots`` reach through imports, with the module that first imports it."""
    seen: dict[str, str] = {root: root for root in roots}
    todo = list(roots)
    while todo:
        module = todo.pop()
        for imported in daemon_imports((DAEMON / f"{module}.py").read_text()):
            if imported not in seen:
                seen[imported] = module
                todo.append(imported)
    return seen


def test_the_scan_sees_imports_inside_functions():
    source = "def f():\n    from fixative.daemon.status import render\n    import fixative.daemon.doctor\n"
    assert daemon_imports(source) == {"status", "doctor"}
    assert "status" in reachable(("cli",))  # the command line does reach the commands


def test_no_running_process_imports_a_command_module():
    found = reachable(RUNNING)
    assert {module: f"imported by {found[module]}" for module in COMMANDS & found.keys()} == {}
