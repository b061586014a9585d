"""The client's layering: its modules import one another without cycles, and only at module level.

A cycle is a layout problem, not something to hide behind an import inside a function or under
``TYPE_CHECKING``: both count here. Only optional dependencies may be imported inside a function.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

import gpupool.client

PACKAGE = "gpupool.client"
CLIENT = Path(gpupool.client.__file__).parent
#: Dependencies gpupool does not require, which a client module may import where it uses them.
OPTIONAL = frozenset({"cupy", "rich", "tqdm"})


def module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


MODULES = {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(CLIENT.glob("*.py"))}


def imports(name: str, tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in ``tree`` (anywhere in it), with each module it imports."""
    found: list[tuple[ast.Import | ast.ImportFrom, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (name if name == PACKAGE else name.rpartition(".")[0]).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # ``from package import submodule`` imports the submodule.
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            found.extend((node, m if m in MODULES else module) for m in submodules)
    return found


def client_imports(name: str) -> set[str]:
    """The client modules ``name`` imports, by their full names."""
    edges = set()
    for _, module in imports(name, MODULES[name]):
        while module and module not in MODULES:
            module = module.rpartition(".")[0]
        if module and module != name:
            edges.add(module)
    return edges


def test_the_client_modules_import_one_another_without_cycles() -> None:
    graph = {name: client_imports(name) for name in MODULES}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"an import cycle among the client's modules: {' -> '.join(exc.args[1])}")
    assert order[-1] == PACKAGE  # the package imports its modules; none imports the package


def test_no_client_module_imports_inside_a_function() -> None:
    offenders = []
    for name, tree in MODULES.items():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node, module in imports(name, function):
                if module.partition(".")[0] not in OPTIONAL:
                    offenders.append(f"{name}:{node.lineno} ({function.name}) imports {module}")
    assert not offenders, "\n".join(offenders)


#: Loads one client module with only what it imports: empty stand-ins for the packages ``gpupool`` and
#: ``gpupool.client``, so neither ``__init__`` runs first and imports the rest in its own order.
IMPORT_ALONE = """
import importlib, sys, types
for name, path in (("gpupool", sys.argv[2]), ("gpupool.client", sys.argv[3])):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
importlib.import_module(sys.argv[1])
"""


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_client_module_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    if name == PACKAGE:
        command = [sys.executable, "-c", f"import {name}"]
    else:
        command = [sys.executable, "-c", IMPORT_ALONE, name, str(CLIENT.parent), str(CLIENT)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
