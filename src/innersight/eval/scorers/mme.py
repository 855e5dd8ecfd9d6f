"""MME: per-subtask acc and acc+ (x100 each), perception and cognition sums.

Yes/no parsing (``canonical``: MME's own ``calculation.py``): lower-case only -- no stripping, no
punctuation removed; if the result is exactly ``yes`` or ``no`` that is the answer; otherwise
look at its first four characters: ``yes`` among them -> yes, else ``no`` among them -> no,
else ``other`` (always wrong). So ``"Yes, there is."`` -> yes, ``"Not at all"`` -> no (``"not "``
contains ``no``), ``"There is a dog"`` -> other, and ``"  yes"`` (``"  ye"``) and ``"...no"``
(``"...n"``) -> other.

Variant ``lmms-eval``: the parse of lmms-eval's MME task (after Otter's), which first strips
whitespace and deletes every ``.``: ``"  yes"`` -> yes, ``"...no"`` -> no. Metrics are the same.

Per subtask: ``acc`` = correct questions / questions x100; ``acc_plus`` = images whose questions
(two per image in MME) are all right / images x100; ``score`` = acc + acc_plus (max 200).
Perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4
cognition scores (max 800), hallucination = sum over existence, count, position, color. A sum
is reported only when every one of its subtasks is present in the rows, so a partial run never
passes for a full score.

Sample fields: ``answer`` (or ``label``): yes/no; ``category``: the subtask (case-insensitive,
reported with MME's spelling, e.g. ``OCR``); ``image_id`` (or ``question_id``, which in the
``lmms-lab/MME`` copy is the image path shared by the image's two questions): the acc+ group.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from .base import Row, Scorer, percent, require_rows, yes_no_label

PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)  # fmt: skip
HALLUCINATION: tuple[str, ...] = ("existence", "count", "position", "color")
SUBTASKS: tuple[str, ...] = PERCEPTION + COGNITION
_BY_LOWER = {s.lower(): s for s in SUBTASKS}

OTHER = "other"


def parse_yes_no(text: str) -> str:
    """MME's own parse: ``yes``, ``no`` or ``other`` (see module docstring)."""
    return _parse_lowered(text.lower())


def parse_yes_no_lmms_eval(text: str) -> str:
    """lmms-eval's parse: strip and delete every ``.`` before MME's rule."""
    return _parse_lowered(text.lower().strip().replace(".", ""))


def _parse_lowered(answer: str) -> str:
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return OTHER


def subtask(name: str) -> str:
    """MME's spelling of a subtask name given in any case; ``ValueError`` if unknown."""
    try:
        return _BY_LOWER[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown MME subtask {name!r}; known: {', '.join(SUBTASKS)}") from None


def score_one(prediction: str, sample: Mapping[str, Any], parse: Callable[[str], str] = parse_yes_no) -> Row:
    """Parse the answer; the row carries category and image id for acc+."""
    label = yes_no_label(sample)
    image = sample["image_id"] if "image_id" in sample else sample["question_id"]
    parsed = parse(prediction)
    return {
        "category": subtask(sample["category"]),
        "image_id": str(image),
        "label": label,
        "parsed": parsed,
        "correct": parsed == label,
    }


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``<subtask>/acc``, ``<subtask>/acc_plus``, ``<subtask>/score`` for every subtask present;
    ``perception``, ``cognition``, ``hallucination``, ``total`` when complete; ``other``, ``n``."""
    require_rows(rows)
    questions: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, bool]] = defaultdict(dict)
    for row in rows:
        category, correct = row["category"], bool(row["correct"])
        questions[category].append(correct)
        group = images[category]
        group[row["image_id"]] = group.get(row["image_id"], True) and correct
    out: dict[str, Any] = {}
    scores: dict[str, float] = {}
    for category in SUBTASKS:
        if category not in questions:
            continue
        acc = percent(sum(questions[category]), len(questions[category]))
        acc_plus = percent(sum(images[category].values()), len(images[category]))
        scores[category] = acc + acc_plus
        out[f"{category}/acc"] = acc
        out[f"{category}/acc_plus"] = acc_plus
        out[f"{category}/score"] = scores[category]
    for name, members in (
        ("perception", PERCEPTION),
        ("cognition", COGNITION),
        ("hallucination", HALLUCINATION),
    ):
        if all(m in scores for m in members):
            out[name] = sum(scores[m] for m in members)
    if "perception" in out and "cognition" in out:
        out["total"] = out["perception"] + out["cognition"]
    out["other"] = sum(1 for r in rows if r["parsed"] == OTHER)
    out["n"] = len(rows)
    return out


HIGHER_IS_BETTER: dict[str, bool | None] = {
    **{f"{s}/{m}": True for s in SUBTASKS for m in ("acc", "acc_plus", "score")},
    "perception": True,
    "cognition": True,
    "hallucination": True,
    "total": True,
    "other": False,
    "n": None,
}

SCORERS: tuple[Scorer, ...] = (
    Scorer(
        "mme",
        "canonical",
        HIGHER_IS_BETTER,
        score_one,
        aggregate,
        "MME: per subtask acc + acc+ (x100); perception = 10 subtasks, cognition = 4; MME's own yes/no parse",
    ),
    Scorer(
        "mme",
        "lmms-eval",
        HIGHER_IS_BETTER,
        partial(score_one, parse=parse_yes_no_lmms_eval),
        aggregate,
        "MME metrics with lmms-eval's parse (strip, delete '.', then MME's rule)",
    ),
)
