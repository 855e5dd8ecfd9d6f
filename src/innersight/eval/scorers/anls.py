"""DocVQA: ANLS (canonical) and ViCrop's substring-containment variant.

Canonical ANLS per question: both strings normalised (lower-case, trimmed, runs of whitespace
collapsed to one space); for each reference answer ``g``, ``NL = Levenshtein(g, p) /
max(len(g), len(p))`` (0 when both are empty); the answer's similarity is ``1 - NL`` if
``NL < 0.5`` and 0 otherwise (a distance of exactly 0.5 scores 0); the question scores the max
over its answers; the benchmark score is the mean over questions (reported x100).

Official-script variant (``official-docvqa``), the DocVQA evaluation script of the RRC site:
the edit distance is taken between the normalised strings, but divided by the longer of the
**raw** strings (``len(s.upper())`` of the answer and the prediction as given, before trimming
and collapsing spaces), and the threshold is applied to the similarity ``1 - min NL``: a
question scoring below 0.5 gets 0, one scoring exactly 0.5 keeps it. So ``"x1"`` vs ``"xy"``
(distance 1, length 2) scores 0.5 there and 0 in the canonical definition, and ``" X1 "`` vs
``"xy"`` scores 1 - 1/4 = 0.75 there.

ViCrop variant (``vicrop``): a question is right (1) when the raw prediction is a substring of
some answer or some answer is a substring of the prediction -- case-sensitive, no
normalisation at all. Because the empty string is a substring of every string, **an empty
prediction counts as correct**. That is a bug in the reference script, reproduced here on
purpose and only in this variant so that the paper's table can be re-computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import Row, Scorer, percent, require_rows, text_answers

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) between ``a`` and ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),  # substitute (free when equal)
                )
            )
        previous = current
    return previous[-1]


def normalize_anls(text: str) -> str:
    """Lower-case, trim, collapse whitespace runs to one space."""
    return " ".join(text.strip().lower().split())


def normalized_distance(answer: str, prediction: str) -> float:
    """``Levenshtein / max(len)`` of two already normalised strings; 0.0 for two empty strings."""
    length = max(len(answer), len(prediction))
    return levenshtein(answer, prediction) / length if length else 0.0


def anls(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD) -> float:
    """ANLS of one question in ``[0, 1]``: max over answers of ``1 - NL`` (0 where ``NL >= threshold``)."""
    pred = normalize_anls(prediction)
    best = 0.0
    for answer in answers:
        nl = normalized_distance(normalize_anls(answer), pred)
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls_official_docvqa(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD) -> float:
    """ANLS of one question as the official DocVQA script computes it (module docstring)."""
    pred = normalize_anls(prediction)
    distances = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))  # raw lengths
        distances.append(levenshtein(normalize_anls(answer), pred) / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return 0.0 if similarity < threshold else similarity


def vicrop_contains(prediction: str, answers: Sequence[str]) -> bool:
    """ViCrop's test: ``prediction in answer or answer in prediction`` for some answer (raw text).

    An empty prediction is therefore always right (reference bug, reproduced deliberately).
    """
    return any(prediction in answer or answer in prediction for answer in answers)


def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
    """Canonical ANLS of one answer; ``sample["answers"]``: the reference answers."""
    return {"parsed": normalize_anls(prediction), "anls": anls(prediction, text_answers(sample))}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``anls``: mean per-question ANLS in percent; ``n``."""
    require_rows(rows)
    return {"anls": percent(sum(float(r["anls"]) for r in rows), len(rows)), "n": len(rows)}


def score_one_official(prediction: str, sample: Mapping[str, Any]) -> Row:
    """ANLS of one answer by the official DocVQA script's arithmetic."""
    return {"parsed": normalize_anls(prediction), "anls": anls_official_docvqa(prediction, text_answers(sample))}


def score_one_vicrop(prediction: str, sample: Mapping[str, Any]) -> Row:
    """ViCrop's substring containment either way (case-sensitive; empty prediction is right)."""
    return {"parsed": prediction, "correct": vicrop_contains(prediction, text_answers(sample))}


def aggregate_vicrop(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``accuracy``: share of questions passing the containment test, in percent; ``n``."""
    require_rows(rows)
    return {"accuracy": percent(sum(1 for r in rows if r["correct"]), len(rows)), "n": len(rows)}


SCORERS: tuple[Scorer, ...] = (
    Scorer(
        "docvqa",
        "canonical",
        {"anls": True, "n": None},
        score_one,
        aggregate,
        "ANLS (Levenshtein / max length, threshold 0.5, max over answers; lower/trim/collapse spaces)",
    ),
    Scorer(
        "docvqa",
        "official-docvqa",
        {"anls": True, "n": None},
        score_one_official,
        aggregate,
        "official DocVQA script: distance of normalised strings / max raw length; similarity 0.5 kept",
    ),
    Scorer(
        "docvqa",
        "vicrop",
        {"accuracy": True, "n": None},
        score_one_vicrop,
        aggregate_vicrop,
        "ViCrop: case-sensitive substring containment either way (empty prediction counts as right)",
    ),
)
