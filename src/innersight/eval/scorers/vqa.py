"""VQA soft accuracy with the standard VQA answer normalisation (TextVQA, VQAv2, A-OKVQA).

Normalisation (the VQA evaluation's answer processor, applied to the prediction and to every
human answer):

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches
   a space somewhere in the text (``"p "`` or ``" p"`` occurs) or when the text contains a comma
   between two digits (``"1,000"`` -> ``"1000"``); otherwise it is replaced by a space
   (``"t-shirt"`` -> ``"t shirt"``). Apostrophes and colons are kept;
3. periods: a period is deleted unless a digit follows it, so ``"3.5"`` keeps its period and
   ``"dogs."`` loses it. (The reference regex means "unless between digits", but its look-behind
   is mistyped as a look-ahead, so only the following character is checked: ``".5"`` and
   ``"no.7"`` keep their period too. We reproduce the reference behaviour so that scores match
   published numbers.);
4. lower-case, split on whitespace, number words ``none``/``zero``..``ten`` -> digits
   (``none`` -> ``0`` as in the reference), articles ``a``/``an``/``the`` dropped;
5. contractions written without the apostrophe are restored (``dont`` -> ``don't``).

Soft accuracy over ``n`` human answers (``n`` = 10 in all three benchmarks): the mean over the
``n`` leave-one-out subsets of ``min(1, matches among the other n-1 / 3)``. For ``n = 10`` this
equals ``min(1, 0.3 * matches)`` for every match count (m <= 3: (m(m-1)/3 + (10-m)m/3)/10 =
0.3m; m >= 4: every subset still holds >= 3 matches), whereas the naive ``min(1, matches / 3)``
differs at m = 1, 2, 3 (0.33/0.67/1.0 instead of 0.3/0.6/0.9).

Variant ``official-vqaeval`` (textvqa, vqav2): the official VQA evaluation script
(``vqaEval.py``) normalises only when the human answers disagree. Every answer and the
prediction get newlines/tabs replaced and are stripped; then, **only if** the raw answers are
not all identical, all of them and the prediction are normalised as above. When all ten
answers are the same string, the prediction is compared with them as given: ``"Yes"`` against
ten ``"yes"`` scores 0 (canonical: 1), and so does ``"yes."``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Row, Scorer, percent, require_rows, text_answers

#: punctuation handled by the punctuation rule (period handled separately)
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

#: apostrophe-less spelling -> contraction. The reference table also lists ``Id've``, ``I'dve``,
#: ``Im`` and ``Ive`` with a capital I; the text is lower-cased before lookup, so those entries
#: never fire there and are left out here (``im`` stays ``im``). Identity entries (``let's``,
#: ``she's``) are omitted as no-ops. ``somebody'd -> somebodyd`` runs backwards in the reference;
#: it is kept because both sides are normalised alike, so matching is unaffected either way.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def process_punctuation(text: str) -> str:
    """Steps 2-3 of the normalisation: the punctuation rule, then the period rule."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # the "touches a space" test looks at the input text, not at the partly cleaned one
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digits_articles(text: str) -> str:
    """Steps 4-5: lower-case, number words -> digits, drop articles, restore contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The standard VQA answer normalisation (module docstring): ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def soft_accuracy_normalized(prediction: str, answers: Sequence[str]) -> float:
    """Leave-one-out VQA accuracy of an already normalised prediction against normalised answers.

    Mean over ``i`` of ``min(1, #{j != i : answers[j] == prediction} / 3)``. Needs >= 2 answers
    (with one answer every leave-one-out subset is empty).
    """
    n = len(answers)
    if n < 2:
        raise ValueError(f"VQA soft accuracy needs at least 2 human answers, got {n}")
    matches = sum(1 for a in answers if a == prediction)
    total = 0.0
    for answer in answers:
        others = matches - (1 if answer == prediction else 0)
        total += min(1.0, others / 3.0)
    return total / n


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy in ``[0, 1]``: normalise both sides, then :func:`soft_accuracy_normalized`."""
    return soft_accuracy_normalized(
        normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers]
    )


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def official_vqaeval_answers(prediction: str, answers: Sequence[str]) -> tuple[str, list[str]]:
    """``(prediction, answers)`` as the official ``vqaEval.py`` compares them: whitespace-cleaned,
    and normalised only when the cleaned answers are not all identical."""
    pred = _strip_whitespace(prediction)
    gts = [_strip_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        return normalize_vqa_answer(pred), [normalize_vqa_answer(a) for a in gts]
    return pred, gts


def score_one_official(prediction: str, sample: Mapping[str, Any]) -> Row:
    """Score one answer the way the official VQA script does (see the module docstring)."""
    parsed, answers = official_vqaeval_answers(prediction, text_answers(sample))
    return {
        "parsed": parsed,
        "matches": sum(1 for a in answers if a == parsed),
        "accuracy": soft_accuracy_normalized(parsed, answers),
    }


def score_one(prediction: str, sample: Mapping[str, Any]) -> Row:
    """Score one answer; ``sample["answers"]``: the human answers (strings or ``{"answer": ...}``)."""
    parsed = normalize_vqa_answer(prediction)
    answers = [normalize_vqa_answer(a) for a in text_answers(sample)]
    return {
        "parsed": parsed,
        "matches": sum(1 for a in answers if a == parsed),
        "accuracy": soft_accuracy_normalized(parsed, answers),
    }


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``accuracy``: mean soft accuracy in percent; ``n``: number of questions."""
    require_rows(rows)
    return {"accuracy": percent(sum(float(r["accuracy"]) for r in rows), len(rows)), "n": len(rows)}


HIGHER_IS_BETTER: dict[str, bool | None] = {"accuracy": True, "n": None}
_DESCRIPTION = "VQA soft accuracy (leave-one-out over 10 human answers), standard VQA answer normalisation"

_OFFICIAL = "official vqaEval.py: normalised only when the human answers differ (\"Yes\" vs ten \"yes\" scores 0)"

SCORERS: tuple[Scorer, ...] = tuple(
    Scorer(name, "canonical", HIGHER_IS_BETTER, score_one, aggregate, f"{_DESCRIPTION}{extra}")
    for name, extra in (
        ("textvqa", ""),
        ("vqav2", ""),
        ("aokvqa", " (direct answers)"),
    )
) + tuple(
    Scorer(name, "official-vqaeval", HIGHER_IS_BETTER, score_one_official, aggregate, _OFFICIAL)
    for name in ("textvqa", "vqav2")
)
