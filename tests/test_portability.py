"""Tandem runs where its users are: Linux, macOS and Windows, on the Python versions it names.

No module imports a POSIX-only module unguarded (the data directory lock
picks `fcntl` or `msvcrt` by platform), and the running Python is within the
range that pyproject.toml and server.py state.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib

from helpers import ROOT

import server

# Standard modules that do not exist on Windows.
POSIX_ONLY = frozenset({"fcntl", "resource", "pwd", "grp", "termios", "pty", "tty", "syslog", "crypt", "posix"})


def guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a function (imported when called), under a platform test, or in a try that handles ImportError."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return True
        if isinstance(node, ast.If) and re.search(r"sys\.platform|os\.name", ast.unparse(node.test)):
            return True
        if isinstance(node, ast.Try) and any(
            h.type is not None and re.search(r"ImportError|ModuleNotFoundError", ast.unparse(h.type))
            for h in node.handlers
        ):
            return True
    return False


def test_no_module_imports_a_posix_only_module_unguarded() -> None:
    offenders = []
    modules = sorted(ROOT.glob("*.py"))
    assert len(modules) > 10
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            if any(name.split(".")[0] in POSIX_ONLY for name in names) and not guarded(node, parents):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == [], offenders


def test_the_data_directory_lock_has_a_windows_branch() -> None:
    source = (ROOT / "sqlite_store.py").read_text(encoding="utf-8")
    assert "msvcrt" in source and "fcntl" in source


def test_the_running_python_is_one_tandem_supports_and_both_places_agree() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    spec = pyproject["project"]["requires-python"]
    match = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", spec)
    assert match, spec
    low, above = (int(match[1]), int(match[2])), (int(match[3]), int(match[4]))
    assert (low, (above[0], above[1] - 1)) == server.SUPPORTED_PYTHON, (server.SUPPORTED_PYTHON, spec)
    assert low <= sys.version_info[:2] < above, f"Python {sys.version_info[:2]} is outside {spec}"
