"""AMBER (Wang et al. 2023, arXiv 2311.07397): LLM-free hallucination scores.

Generative task (``amber-g``; the official ``inference.py``, evaluation type ``g``): the nouns of
a description that belong to AMBER's object vocabulary (the keys and values of
``relation.json``) are checked against the image's annotation, in this order:

1. a noun in ``safe_words.txt`` is neither right nor hallucinated (but counts as a mention);
2. a noun among the image's ``truth`` objects or their associated words (``relation.json``)
   covers that truth object;
3. otherwise it is a hallucinated mention; when it is one of the image's ``hallu`` objects (or
   their associated words) it also counts towards Cog.

Metrics (percent): ``chair`` = hallucinated mentions / all mentions; ``cover`` = truth objects
covered / truth objects; ``hal`` = share of descriptions with a hallucinated mention; ``cog`` =
``hallu`` objects mentioned / ``hallu`` objects. A duplicated truth object (``"ship", "ship"``)
is two entries of which a mention covers the first, as in the official script.

What differs from ``inference.py`` (it needs NLTK's tagger and lemmatiser and spaCy's 600 MB
``en_core_web_lg``, which innersight does not install): nouns are the vocabulary words among the
answer's words (no part-of-speech filter, so a verb spelt like an object, "watch", counts), plural
forms are reduced by rule (``-ies``/``-es``/``-s`` and irregular plurals such as ``men``), and the
spaCy similarity > 0.8 synonym step is not applied. Matching is case-sensitive, as there (the
official lemmatiser does not lower-case, so "Sky" does not match "sky").

Discriminative task (``amber-d``; evaluation types ``d``, ``de``, ``da``, ``dr``): the answer is
``Yes`` or ``No`` exactly (``canonical``, the official comparison; anything else is wrong and
never a "no"), or the first word that is yes/no in any case (``first_word``). The positive class
is **no** (the official precision and recall): ``precision`` = right "No" / all "No" answers,
``recall`` = right "No" / questions whose truth is no, ``f1`` = 2PR / (P + R + 0.0001) as
there (the script rounds P and R to one decimal first; here they are not rounded). Also
``accuracy`` per dimension (existence, attribute, relation) and the ``yes_ratio`` of the answers
(arXiv 2504.10020's control).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Row, Scorer, percent, require_rows

UNKNOWN = "unknown"
DIMENSIONS = ("existence", "attribute", "relation")
_WORDS = re.compile(r"[A-Za-z]+")
#: irregular plurals WordNet's lemmatiser maps to a singular
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "geese": "goose",
             "feet": "foot", "teeth": "tooth", "mice": "mouse", "oxen": "ox", "knives": "knife", "leaves": "leaf",
             "shelves": "shelf", "wolves": "wolf", "loaves": "loaf", "calves": "calf", "scarves": "scarf"}


def dimension(kind: str) -> str:
    """The AMBER dimension of an annotation ``type``: existence, attribute or relation."""
    if kind == "discriminative-hallucination":
        return "existence"
    if kind.startswith("discriminative-attribute"):
        return "attribute"
    if kind == "discriminative-relation":
        return "relation"
    raise ValueError(f"not a discriminative AMBER type: {kind!r}")


def lemma(word: str, vocabulary: frozenset[str] | set[str]) -> str:
    """``word`` reduced to a vocabulary word by the plural rules, or unchanged."""
    if word in vocabulary:
        return word
    if word in IRREGULAR:
        return IRREGULAR[word]
    for suffix, replacement in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and word[: -len(suffix)] + replacement in vocabulary:
            return word[: -len(suffix)] + replacement
    return word


def object_mentions(text: str, vocabulary: frozenset[str] | set[str]) -> list[str]:
    """The vocabulary words mentioned in ``text``, in order, plurals reduced (repeats kept)."""
    out = []
    for word in _WORDS.findall(text or ""):
        base = lemma(word, vocabulary)
        if base in vocabulary:
            out.append(base)
    return out


def _expanded(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """The official word list: every object's associated words (tagged with the object's index),
    then the objects themselves (tagged with their own position among them)."""
    words: list[str] = []
    owner: list[int] = []
    for index, word in enumerate(objects):
        related = list(association.get(word, ()))
        words += related
        owner += [index] * len(related)
    words += list(objects)
    owner += list(range(len(objects)))
    return words, owner


def score_generative(prediction: str, sample: Mapping[str, Any]) -> Row:
    """Mentions, hallucinated mentions, covered truth and ``hallu`` objects of one description."""
    vocabulary = sample["vocabulary"]
    association = sample["association"]
    safe = sample["safe_words"]
    truth, hallu = list(sample["truth"]), list(sample["hallu"])
    safe_words, safe_owner = _expanded(truth, association)
    hallu_words, hallu_owner = _expanded(hallu, association)
    mentions = object_mentions(prediction, vocabulary)
    covered: set[int] = set()
    hallu_hit: set[int] = set()
    hallucinated: list[str] = []
    for noun in mentions:
        if noun in safe:
            continue
        if noun in safe_words:
            covered.add(safe_owner[safe_words.index(noun)])
            continue
        if noun in hallu_words:
            hallu_hit.add(hallu_owner[hallu_words.index(noun)])
        hallucinated.append(noun)
    return {"mentions": mentions, "hallucinated": hallucinated, "n_mentions": len(mentions),
            "n_hallucinated": len(hallucinated), "covered": len(covered), "n_truth": len(truth),
            "hallu_mentioned": len(hallu_hit), "n_hallu": len(hallu)}


def aggregate_generative(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """chair, cover, hal, cog (percent) and the counts behind them."""
    require_rows(rows)
    mentions = sum(r["n_mentions"] for r in rows)
    return {
        "chair": percent(sum(r["n_hallucinated"] for r in rows), mentions),
        "cover": percent(sum(r["covered"] for r in rows), sum(r["n_truth"] for r in rows)),
        "hal": percent(sum(1 for r in rows if r["n_hallucinated"] > 0), len(rows)),
        "cog": percent(sum(r["hallu_mentioned"] for r in rows), sum(r["n_hallu"] for r in rows)),
        "mentions": mentions,
        "n": len(rows),
    }


def parse_exact(text: str) -> str:
    """``yes``/``no`` when the answer is exactly ``Yes``/``No`` (the official comparison)."""
    return {"Yes": "yes", "No": "no"}.get(text, UNKNOWN)


def parse_first_word(text: str) -> str:
    """The first word (any case) that is yes or no, else ``unknown``."""
    for word in _WORDS.findall(text.lower()):
        if word in ("yes", "no"):
            return word
    return UNKNOWN


def _discriminative(parse: Any) -> Any:
    def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
        label = str(sample["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"AMBER truth must be yes or no, got {sample['label']!r}")
        parsed = parse(prediction)
        return {"label": label, "parsed": parsed, "correct": parsed == label, "dimension": sample["dimension"]}

    return score_one


def _f1(precision: float, recall: float) -> float:
    p, r = precision / 100, recall / 100
    return 100 * 2 * p * r / (p + r + 0.0001)


def aggregate_discriminative(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """accuracy, precision / recall / f1 of the 'no' class, yes_ratio, per-dimension accuracy."""
    require_rows(rows)
    said_no = [r for r in rows if r["parsed"] == "no"]
    truth_no = [r for r in rows if r["label"] == "no"]
    precision = percent(sum(1 for r in said_no if r["label"] == "no"), len(said_no))
    recall = percent(sum(1 for r in truth_no if r["parsed"] == "no"), len(truth_no))
    out: dict[str, Any] = {
        "accuracy": percent(sum(1 for r in rows if r["correct"]), len(rows)),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": percent(sum(1 for r in rows if r["parsed"] == "yes"), len(rows)),
        "unknown": sum(1 for r in rows if r["parsed"] == UNKNOWN),
        "n": len(rows),
    }
    for dim in DIMENSIONS:
        part = [r for r in rows if r["dimension"] == dim]
        if part:
            out[f"{dim}_accuracy"] = percent(sum(1 for r in part if r["correct"]), len(part))
    return out


GENERATIVE_BETTER: dict[str, bool | None] = {"chair": False, "cover": True, "hal": False, "cog": False,
                                             "mentions": None, "n": None}
DISCRIMINATIVE_BETTER: dict[str, bool | None] = {
    "accuracy": True, "precision": True, "recall": True, "f1": True, "yes_ratio": None, "unknown": False, "n": None,
    **{f"{d}_accuracy": True for d in DIMENSIONS},
}

SCORERS: tuple[Scorer, ...] = (
    Scorer("amber-g", "canonical", GENERATIVE_BETTER, score_generative, aggregate_generative,
           "AMBER generative: CHAIR / Cover / Hal / Cog over AMBER's vocabulary (no spaCy synonym step)"),
    Scorer("amber-d", "canonical", DISCRIMINATIVE_BETTER, _discriminative(parse_exact), aggregate_discriminative,
           "AMBER discriminative: exact 'Yes'/'No'; accuracy, P/R/F1 of the 'no' class"),
    Scorer("amber-d", "first_word", DISCRIMINATIVE_BETTER, _discriminative(parse_first_word),
           aggregate_discriminative, "AMBER discriminative: first yes/no word in any case"),
)
