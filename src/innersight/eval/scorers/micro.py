"""Scorers of the micro world's benchmarks.

``micro-details/canonical``: exact match after VQA normalisation (GQA's canonical definition,
registered under the benchmark's own name so that runs, errors and figures name it).

``micro-chair/canonical``: CHAIR over the micro world's object kinds (the bundled micro model's
description task).

The micro world's descriptions list objects as ``"a <colour> <kind>[ with <symbol>]"``; this
scorer parses them with :func:`innersight.demo.world.parse_description` and counts, like CHAIR
(Rohrbach et al. 2018), mentions of object kinds that are not in the scene. The scene's kinds
come with the sample as ``gt_objects``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import gqa
from .base import Row, Scorer, percent, require_rows

HIGHER_IS_BETTER = {"chair_s": False, "chair_i": False, "recall": True, "mentions": None, "captions": None, "n": None}


def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
    from ...demo.world import parse_description

    truth = set(sample["gt_objects"])
    mentioned = [kind for _, kind, _ in parse_description(prediction or "")]
    hallucinated = [k for k in mentioned if k not in truth]
    return {"mentioned": mentioned, "hallucinated": hallucinated, "covered": sorted(truth & set(mentioned)),
            "n_gt": len(truth), "correct": not hallucinated and set(mentioned) == truth}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    require_rows(rows)
    mentions = sum(len(r["mentioned"]) for r in rows)
    return {
        "chair_i": percent(sum(len(r["hallucinated"]) for r in rows), mentions),
        "chair_s": percent(sum(1 for r in rows if r["hallucinated"]), len(rows)),
        "recall": percent(sum(len(r["covered"]) for r in rows), sum(r["n_gt"] for r in rows)),
        "mentions": mentions,
        "captions": len(rows),
        "n": len(rows),
    }


SCORERS: tuple[Scorer, ...] = (
    Scorer("micro-details", "canonical", gqa.HIGHER_IS_BETTER, gqa.score_one, gqa.aggregate,
           "exact match after VQA normalisation (GQA's definition)"),
    Scorer("micro-chair", "canonical", HIGHER_IS_BETTER, score_one, aggregate,
           "CHAIR_i / CHAIR_s / recall over micro-world object kinds"),
)
