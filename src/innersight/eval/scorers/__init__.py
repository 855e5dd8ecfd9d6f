"""Scorers: pure, torch-free scoring functions for every supported benchmark.

``SCORERS`` maps ``"<benchmark>/<variant>"`` to a :class:`~innersight.eval.scorers.base.Scorer`.
``"<benchmark>/canonical"`` is always the official definition; other variants reproduce the
non-standard protocols used by method papers (named after the paper or the parsing rule):

==========  ============================================================
>>> scorer = get_scorer("pope")
>>> row = scorer.score_one("No, there is not.", {"label": "no"})
>>> row["parsed"], row["correct"]
('no', True)
"""

from __future__ import annotations

from ...registry import Registry
from . import amber, anls, chair, gqa, hrbench, micro, mme, pope, vqa, vstar
from .base import Scorer

__all__ = ["SCORERS", "Scorer", "get_scorer", "register_scorer", "variants"]

#: ``"<benchmark>/<variant>"`` -> scorer, in registration order
SCORERS: Registry[Scorer] = Registry("scorer", missing="unknown scorer {name!r}; scorers: {choices}")


def register_scorer(scorer: Scorer) -> Scorer:
    """Add ``scorer`` to :data:`SCORERS` under its key (``ValueError`` if the key is taken)."""
    return SCORERS.register(scorer.key, scorer)


for _module in (vqa, pope, anls, gqa, mme, vstar, chair, micro, amber, hrbench):
    for _scorer in _module.SCORERS:
        register_scorer(_scorer)


def variants(name: str) -> list[str]:
    """The variants registered for benchmark ``name`` (``canonical`` first)."""
    found = [s.variant for s in SCORERS.values() if s.name == name]
    return sorted(found, key=lambda v: (v != "canonical", v))


def get_scorer(name: str, variant: str = "canonical") -> Scorer:
    """The scorer for ``name`` and ``variant``; ``KeyError`` listing what exists otherwise."""
    key = f"{name}/{variant}"
    if key not in SCORERS:
        names = sorted({s.name for s in SCORERS.values()})
        if name not in names:
            raise KeyError(f"no scorer for benchmark {name!r}; benchmarks: {', '.join(names)}")
        raise KeyError(
            f"benchmark {name!r} has no variant {variant!r}; variants: {', '.join(variants(name))}"
        )
    return SCORERS[key]
