"""No import loop in innersight: the module graph (read with ``ast``, nothing imported) is acyclic.

Two graphs over ``src/innersight``:

- top level: the imports a module runs when it is imported (not those inside functions, nor
  under ``if TYPE_CHECKING``) -- a cycle there is a real module-level loop;
- the flow's layers with deferred imports counted too: ``mllm`` -> ``flow`` -> ``points`` and
  ``methods`` -> ``flow`` must not reach back even from inside a function (the loop ``mllm`` <->
  ``methods`` that ``Plan.run`` used to make).
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

import innersight

ROOT = Path(innersight.__file__).resolve().parent
PACKAGE = "innersight"
FLOW_LAYERS = {"innersight.mllm", "innersight.flow", "innersight.points", "innersight.methods", "innersight.registry"}


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements of ``body``: its own and those in nested blocks; inside functions and
    classes' methods only when ``deferred``; never under ``if TYPE_CHECKING``."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            found.extend(_imports(node.orelse, deferred))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if deferred:
                found.extend(_imports(node.body, deferred))
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    found.extend(_imports([n for n in block if isinstance(n, ast.AST)], deferred))
    return found


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The innersight modules an import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    submodules = {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    # ``from pkg import sub`` needs only the submodule; any other name is read off ``pkg`` itself
    needs_target = target in known and len(submodules) < len(node.names)
    return submodules | ({target} if needs_target else set())


@functools.cache
def import_graph(deferred: bool) -> dict[str, set[str]]:
    modules = module_names()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges: set[str] = set()
        for node in _imports(tree.body, deferred):
            edges |= _resolve(name, path.name == "__init__.py", node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_reader_sees_imports_and_cycles():
    """The reader is not blind: known edges are found, a planted cycle is reported."""
    graph = import_graph(deferred=False)
    assert "innersight.flow" in graph["innersight.mllm"]
    assert "innersight.points" in graph["innersight.flow"]
    assert "innersight.adapters.base" in graph["innersight.mllm"]
    assert "innersight.mllm" not in graph["innersight.points"]  # only under TYPE_CHECKING there
    assert "innersight.methods" in import_graph(deferred=True)["innersight.mllm"]  # inside answer_batch
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph(deferred=False))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_flow_layers_do_not_import_back_even_lazily():
    full = import_graph(deferred=True)
    layers = {name: edges & FLOW_LAYERS for name, edges in full.items() if name in FLOW_LAYERS}
    cycle = find_cycle(layers)
    assert cycle is None, "import cycle among the flow's layers: " + " -> ".join(cycle or [])
    assert not full["innersight.points"] - {"innersight.errors"}, "points imports nothing of innersight"


@pytest.mark.heavy
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module, imported first in a new interpreter, loads (a loop would raise ImportError on
    a partly initialised module)."""
    names = [n for n in module_names() if not n.endswith("__main__")]  # __main__ runs the CLI
    code = ("import importlib, sys\nbad = []\n"
            f"for name in {names!r}:\n"
            "    for key in [k for k in sys.modules if k.startswith('innersight')]:\n"
            "        del sys.modules[key]\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except ImportError as exc:\n        bad.append(f'{name}: {exc}')\n"
            "print('\\n'.join(bad))\nsys.exit(1 if bad else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
