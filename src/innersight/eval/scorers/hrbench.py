"""HR-Bench 4K / 8K (Wang et al. 2024, arXiv 2408.15556): multiple choice A-D on 4K/8K images.

Each question is asked several times with its options rotated (``cycle_category``); the official
report (VLMEvalKit's ``report_acc_hrbench``, also lmms-eval's ``hrbench``) takes the accuracy of
each cycle and averages over cycles, per task type (``single``: one small object, ``cross``:
relations across the image) and over all questions (``accuracy``).

Answer parsing (``canonical``): the option letter the answer starts with (``B``, ``B.``, ``(B)``,
``B: text``, ``B) text``); else the option whose text the whole answer equals (case and a final
period ignored); else the only standalone letter A-D in the answer (an ``A`` before a lower-case
word is the article); anything else is ``unknown`` and wrong. VLMEvalKit and lmms-eval hand unparsable answers to a GPT judge; innersight does not call
one, so a model that answers in prose can score lower here than there.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Row, Scorer, percent, require_rows

LETTERS = "ABCD"
UNKNOWN = "unknown"
_LEADING = re.compile(r"^(?:\(([A-D])\)|([A-D])(?:[.:)]|$))")
#: a standalone letter; "A" followed by a lower-case word is the article, not an option
_LONE = re.compile(r"\b(?:([B-D])|(A)(?!\s+[a-z]))\b")


def parse_letter(text: str, options: Mapping[str, str]) -> str:
    """The chosen option letter of ``text`` (see the module doc), or ``unknown``."""
    answer = (text or "").strip()
    match = _LEADING.match(answer)
    if match:
        return match.group(1) or match.group(2)
    folded = answer.lower().rstrip(".").strip()
    for letter, option in options.items():
        if folded and folded == str(option).lower().rstrip(".").strip():
            return letter
    lone = {b or a for b, a in _LONE.findall(answer)}
    return lone.pop() if len(lone) == 1 else UNKNOWN


def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
    options = dict(sample["options"])
    label = str(sample["answer"]).strip().upper()
    if label not in options:
        raise ValueError(f"HR-Bench answer {sample['answer']!r} is not one of the options {sorted(options)}")
    parsed = parse_letter(prediction, options)
    return {"parsed": parsed, "label": label, "correct": parsed == label, "category": sample["category"],
            "cycle": str(sample.get("cycle_category", ""))}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """accuracy, single, cross: per-cycle accuracies averaged over the cycles present."""
    require_rows(rows)
    cycles: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        cycles[r["cycle"]].append(r)
    out: dict[str, Any] = {}
    per: dict[str, list[float]] = defaultdict(list)
    for members in cycles.values():
        per["accuracy"].append(percent(sum(1 for r in members if r["correct"]), len(members)))
        for category in ("single", "cross"):
            part = [r for r in members if r["category"] == category]
            if part:
                per[category].append(percent(sum(1 for r in part if r["correct"]), len(part)))
    for name, values in per.items():
        out[name] = sum(values) / len(values)
    out["cycles"] = len(cycles)
    out["unknown"] = sum(1 for r in rows if r["parsed"] == UNKNOWN)
    out["n"] = len(rows)
    return out


HIGHER_IS_BETTER: dict[str, bool | None] = {"accuracy": True, "single": True, "cross": True, "cycles": None,
                                            "unknown": False, "n": None}

SCORERS: tuple[Scorer, ...] = (
    Scorer("hrbench", "canonical", HIGHER_IS_BETTER, score_one, aggregate,
           "HR-Bench: option letter; accuracy per option cycle, averaged (single / cross / all)"),
)
