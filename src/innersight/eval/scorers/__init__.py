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

from . import amber, anls, chair, gqa, hrbench, micro, mme, pope, vqa, vstar
from .base import Scorer

__all__ = ["SCORERS", "Scorer", "get_scorer", "variants"]


def _registry(*groups: tuple[Scorer, ...]) -> dict[str, Scorer]:
    registry: dict[str, Scorer] = {}
    for group in groups:
        for scorer in group:
            if scorer.key in registry:
                raise ValueError(f"scorer {scorer.key!r} registered twice")
            registry[scorer.key] = scorer
    return registry


SCORERS: dict[str, Scorer] = _registry(
    vqa.SCORERS, pope.SCORERS, anls.SCORERS, gqa.SCORERS, mme.SCORERS, vstar.SCORERS, chair.SCORERS,
    micro.SCORERS, amber.SCORERS, hrbench.SCORERS,
)


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
