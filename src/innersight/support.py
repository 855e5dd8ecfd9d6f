"""The method x family support matrix, computed from facts (no model, no torch).

Each method says which adapter facets it needs beyond the core contract
(:attr:`innersight.methods.MethodSpec.needs`); each family's adapter class says how it serves a
facet (:meth:`innersight.adapters.base.Adapter.support`): it provides it, it uses a documented
substitute (:attr:`~innersight.adapters.base.Adapter.substitutes`), or it lacks an optional member
and the method refuses with the member's reason
(:data:`~innersight.adapters.base.OPTIONAL_MEMBERS`). A cell is the weakest of its method's needs:

* ``yes``: the method runs on the family as its paper defines it;
* ``substitute``: it runs, with the family's documented substitute for what the paper assumes;
* ``refuses``: it raises :class:`~innersight.errors.MethodError` with the reason shown.

Nothing here is typed by hand per cell: a new method or family appears in the matrix (and in
``tests/test_support_matrix.py``, which runs every cell on the tiny models) by registering it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .adapters import FAMILIES, adapter_class
from .adapters.base import FAMILY_FACTS, OPTIONAL_MEMBERS, SUPPORT_LEVELS
from .methods import METHODS

__all__ = ["LEGEND", "MARKS", "Cell", "cell", "facets", "matrix_json", "support_matrix"]

#: one short mark per support level, for the table
MARKS: dict[str, str] = {"yes": "+", "substitute": "~", "refuses": "x"}

#: what each level means, for the table's legend and the JSON
LEGEND: dict[str, str] = {
    "yes": "runs as its paper defines it",
    "substitute": "runs with the family's documented substitute (see notes)",
    "refuses": "raises a clear error with the reason in the notes",
}


@dataclass(frozen=True)
class Cell:
    """How one family serves one method: ``support`` (one of ``SUPPORT_LEVELS``) and, per facet
    that is not a plain yes, ``(facet, note)`` (the substitute or the refusal reason)."""

    support: str
    notes: tuple[tuple[str, str], ...] = ()

    @property
    def mark(self) -> str:
        return MARKS[self.support]

    def reasons(self) -> list[str]:
        """The notes as ``"facet: note"`` lines."""
        return [f"{facet}: {note}" for facet, note in self.notes]

    def to_json(self) -> dict[str, Any]:
        return {"support": self.support, "notes": self.reasons()}


def facets() -> dict[str, str]:
    """Every facet a method may need: name -> what it is (optional members, then family facts)."""
    members = {name: f"optional adapter member; without it: {reason}" for name, reason in OPTIONAL_MEMBERS.items()}
    return {**members, **FAMILY_FACTS}


def cell(method: str, family: str) -> Cell:
    """How family ``family`` serves method ``method``: the weakest level among the method's needs
    (``refuses`` over ``substitute`` over ``yes``), with the notes of the needs at that level."""
    needs = METHODS.lookup(method).needs
    served = [(facet, *adapter_class(family).support(facet)) for facet in needs]  # (facet, level, note)
    level = max((lvl for _, lvl, _ in served), key=SUPPORT_LEVELS.index, default="yes")
    return Cell(level, tuple((facet, note) for facet, lvl, note in served if lvl == level and lvl != "yes"))


def support_matrix() -> dict[str, dict[str, Cell]]:
    """method -> family -> :class:`Cell`, for every registered method and family (registry order)."""
    return {name: {family: cell(name, family) for family in FAMILIES} for name in METHODS}


def matrix_json() -> dict[str, Any]:
    """The matrix as ``innersight list --json`` prints it: the levels, the facets, each method's
    needs and every cell with its notes."""
    matrix = support_matrix()
    return {
        "levels": dict(LEGEND),
        "facets": facets(),
        "families": list(FAMILIES),
        "needs": {name: list(spec.needs) for name, spec in METHODS.items()},
        "cells": {name: {family: c.to_json() for family, c in row.items()} for name, row in matrix.items()},
    }


def grouped_notes(matrix: dict[str, dict[str, Cell]]) -> list[tuple[str, str, str, list[str]]]:
    """The notes of every cell that is not a plain yes, once per (method, level, note), with the
    families they hold for: ``(method, level, "facet: note", families)``; the table's footnotes."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for method, row in matrix.items():
        for family, c in row.items():
            for reason in c.reasons():
                out.setdefault((method, c.support, reason), []).append(family)
    return [(m, lvl, reason, families) for (m, lvl, reason), families in out.items()]
