"""The house rule of issue 15: every family fact lives in its adapter.

Outside ``adapters/`` and ``testing/`` no code may decide behaviour from a family's name or a family's classes: no
comparison against ``.family`` (``==``, ``!=``, ``in``), no ``.family.startswith(...)``, no lookup of a family's
transformers class or modeling module by name. Read with ``ast``, so comments and docstrings that mention a family are
allowed; a new family then cannot be sent down another family's path by accident.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import innersight

ROOT = Path(innersight.__file__).parent
EXEMPT = ("adapters", "testing")
#: files whose ``family`` is not a model family
OTHER_FAMILIES = {"demo/world.py": "a question family of the synthetic world (read, colour, exist, describe)"}
#: files that build a model of a fixed family rather than decide anything about a loaded one
BUILDERS = {"demo/micro.py": "builds the micro model, a LLaVA-1.5 by definition"}
#: class-name fragments of supported families; a string literal holding one names a family's code
FAMILY_CLASS_WORDS = ("Llava", "Qwen", "InstructBlip", "Gemma", "InternVL", "SmolVLM", "Idefics")
#: a dotted Python name (a class, an attribute or a module path), not a checkpoint name or prose
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if p.relative_to(ROOT).parts[0] not in EXEMPT and p.relative_to(ROOT).as_posix() not in {**OTHER_FAMILIES, **BUILDERS}]


def _is_family(node: ast.AST) -> bool:
    """``x.family`` or a bare name ``family``."""
    return (isinstance(node, ast.Attribute) and node.attr == "family") or (isinstance(node, ast.Name) and node.id == "family")


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare) and any(_is_family(n) for n in [node.left, *node.comparators]):
            found.append(f"{where}: compares a family name")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("startswith", "endswith")
                and _is_family(node.func.value)):
            found.append(f"{where}: tests a family name's prefix")
        if isinstance(node, ast.ImportFrom) and any(w in a.name for a in node.names for w in FAMILY_CLASS_WORDS):
            found.append(f"{where}: imports a family's class")
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and any(w in node.value for w in FAMILY_CLASS_WORDS) and IDENTIFIER.fullmatch(node.value)):
            found.append(f"{where}: names a family's class or module ({node.value!r})")
    return found


def test_no_family_decision_outside_adapters():
    found = [v for path in _modules() for v in _violations(path)]
    assert not found, "family facts outside adapters/:\n" + "\n".join(found)


def test_the_rule_catches_what_it_forbids(tmp_path):
    """The checker itself: each forbidden shape is found, prose is not."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""Qwen2-VL and LLaVA are fine in prose."""\n'
                   "def f(adapter, family):\n"
                   "    if adapter.family == 'llava':\n        pass\n"
                   "    if family in ('a', 'b'):\n        pass\n"
                   "    if adapter.family.startswith('qwen'):\n        pass\n"
                   "    from transformers import LlavaForConditionalGeneration\n"
                   "    return getattr(__import__('transformers'), 'Qwen2VLForConditionalGeneration')\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        found = _violations(bad)
    finally:
        ROOT = old
    assert len(found) == 5, found
