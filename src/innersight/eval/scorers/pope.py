"""POPE (object existence, yes/no): answer parsers and metrics with positive = yes.

Parsers (the prediction is the generated text):

- ``canonical`` (POPE's own evaluator): keep the text before the first ``.``, delete commas,
  split on single spaces; the answer is ``no`` when ``No``, ``no`` or ``not`` is one of the
  words, otherwise ``yes``. Case-sensitive on purpose (``"NO"`` parses as yes), and everything
  that is not a no -- ``"not sure"`` aside, which contains ``not`` -- counts as yes.
- ``substring``: ``yes`` when ``"yes"`` occurs anywhere in the lower-cased text, else ``no``.
- ``exact``: the lower-cased, whitespace-stripped text must be exactly ``yes`` or ``no``;
  anything else is ``unknown`` (``"Yes."`` is unknown).
- ``first_word``: the first word (runs of letters, lower-cased) that is ``yes`` or ``no``
  decides; none -> ``unknown``.
- ``vicrop``: the closer of ``"yes"``/``"no"`` to the raw text by ``difflib`` ratio
  (case-sensitive; a tie goes to ``yes``) -- the ViCrop paper's evaluation script.
- ``damro-vcd``: the POPE scorer of VCD's repository, which DAMRO's published POPE table was
  computed with. It reads the label first: on a ``yes`` question the answer is right when
  ``"yes"`` occurs anywhere in the lower-cased text, on a ``no`` question when ``"no"`` occurs
  anywhere -- also inside another word, so ``"I don't know"`` and ``"Nothing is there, yes"``
  are right on a ``no`` question. The parsed answer is therefore label-dependent: the label
  when the test passes, the other answer when it fails.

Metrics (``aggregate``, percent): accuracy over all questions (``unknown`` is wrong), precision
and recall of the ``yes`` class (an ``unknown`` on a ``yes`` question is a false negative),
F1, and the **yes-ratio of the predictions** (share of questions answered ``yes``; one popular
harness computes it from the labels, which always gives 50). ``unknown`` counts unparsable
answers. Precision is 0 when nothing was predicted ``yes``; F1 is 0 when precision + recall = 0.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .base import Row, Scorer, percent, require_rows, yes_no_label

UNKNOWN = "unknown"
_LETTER_RUNS = re.compile(r"[a-z]+")


def parse_canonical(text: str) -> str:
    """POPE's parse: text before the first '.', commas deleted, split on ' '; No/no/not -> no."""
    head = text.split(".", 1)[0].replace(",", "")
    words = head.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_substring(text: str) -> str:
    """``yes`` if ``"yes"`` is a substring of the lower-cased text, else ``no``."""
    return "yes" if "yes" in text.lower() else "no"


def parse_exact(text: str) -> str:
    """``yes``/``no`` when the lower-cased stripped text is exactly that, else ``unknown``."""
    answer = text.strip().lower()
    return answer if answer in ("yes", "no") else UNKNOWN


def parse_first_word(text: str) -> str:
    """The first word equal to ``yes`` or ``no`` (letters only, lower-cased), else ``unknown``."""
    for word in _LETTER_RUNS.findall(text.lower()):
        if word in ("yes", "no"):
            return word
    return UNKNOWN


def parse_vicrop(text: str) -> str:
    """Whichever of ``"yes"``/``"no"`` has the higher ``difflib.SequenceMatcher`` ratio; ties: yes."""
    yes = difflib.SequenceMatcher(None, text, "yes").ratio()
    no = difflib.SequenceMatcher(None, text, "no").ratio()
    return "yes" if yes >= no else "no"


def score_one_damro_vcd(prediction: str, sample: Mapping[str, Any]) -> Row:
    """VCD's / DAMRO's scorer: the label's own word anywhere in the lower-cased answer is right."""
    label = yes_no_label(sample)
    correct = label in prediction.lower().strip()
    parsed = label if correct else ("no" if label == "yes" else "yes")
    return {"label": label, "parsed": parsed, "correct": correct}


def _make_score_one(parse: Callable[[str], str]) -> Callable[[str, Mapping[str, Any]], Row]:
    def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
        """Parse the answer and compare with ``sample["label"]`` (or ``sample["answer"]``)."""
        label = yes_no_label(sample)
        parsed = parse(prediction)
        return {"label": label, "parsed": parsed, "correct": parsed == label}

    score_one.__doc__ = f"POPE score_one with parser {parse.__name__}."
    return score_one


def confusion(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Counts ``tp``, ``fp``, ``tn``, ``fn`` (yes = positive; unknown on a yes question = fn),
    ``unknown`` and ``predicted_yes``."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "unknown": 0, "predicted_yes": 0}
    for row in rows:
        label, parsed = row["label"], row["parsed"]
        if parsed == UNKNOWN:
            counts["unknown"] += 1
        if parsed == "yes":
            counts["predicted_yes"] += 1
            counts["tp" if label == "yes" else "fp"] += 1
        elif label == "yes":  # "no" or unknown on a positive question
            counts["fn"] += 1
        elif parsed == "no":
            counts["tn"] += 1
    return counts


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """accuracy, precision, recall, f1, yes_ratio (of predictions), in percent; unknown, n."""
    require_rows(rows)
    c = confusion(rows)
    n = len(rows)
    precision = percent(c["tp"], c["tp"] + c["fp"])
    recall = percent(c["tp"], c["tp"] + c["fn"])
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "accuracy": percent(c["tp"] + c["tn"], n),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": percent(c["predicted_yes"], n),
        "unknown": c["unknown"],
        "n": n,
    }


HIGHER_IS_BETTER: dict[str, bool | None] = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "yes_ratio": None,  # diagnostic: 50 is the balanced value on POPE
    "unknown": False,
    "n": None,
}

PARSERS: dict[str, Callable[[str], str]] = {
    "canonical": parse_canonical,
    "substring": parse_substring,
    "exact": parse_exact,
    "first_word": parse_first_word,
    "vicrop": parse_vicrop,
}

_DESCRIPTIONS = {
    "canonical": "POPE's parse (before first '.', no commas, 'No'/'no'/'not' among words -> no)",
    "substring": "yes iff 'yes' is a substring of the lower-cased answer",
    "exact": "lower/strip exact 'yes' or 'no', else unknown",
    "first_word": "first word that is 'yes' or 'no', else unknown",
    "vicrop": "closer of 'yes'/'no' by difflib ratio (ViCrop's script)",
}

SCORERS: tuple[Scorer, ...] = tuple(
    Scorer("pope", variant, HIGHER_IS_BETTER, _make_score_one(parse), aggregate, _DESCRIPTIONS[variant])
    for variant, parse in PARSERS.items()
) + (
    Scorer("pope", "damro-vcd", HIGHER_IS_BETTER, score_one_damro_vcd, aggregate,
           "VCD's scorer (DAMRO's POPE table): right iff the label's word ('yes'/'no') occurs anywhere in the "
           "lower-cased answer"),
)
