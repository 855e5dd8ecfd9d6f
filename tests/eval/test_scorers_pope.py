"""POPE parsers and metrics: hand-worked cases."""

from __future__ import annotations

import pytest

from innersight.eval.scorers import get_scorer, pope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("There is no dog.", "no"),
        ("not sure", "no"),
        ("No", "no"),
        ("NO", "yes"),  # case-sensitive word test
        ("Yes, there is no cat.", "no"),  # 'no' among the words of the first sentence
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_canonical_parse(text: str, expected: str) -> None:
    assert pope.parse_canonical(text) == expected


@pytest.mark.parametrize(
    ("text", "substring", "exact", "first_word"),
    [
        ("Yes.", "yes", "unknown", "yes"),
        (" YES ", "yes", "yes", "yes"),
        ("no", "no", "no", "no"),
        ("not sure", "no", "unknown", "unknown"),
        ("Her eyes are closed", "yes", "unknown", "unknown"),  # substring quirk: 'eyes'
        ("Well, no. Yes.", "yes", "unknown", "no"),
        ("There is no dog, yes", "yes", "unknown", "no"),
    ],
)
def test_variant_parsers(text: str, substring: str, exact: str, first_word: str) -> None:
    assert pope.parse_substring(text) == substring
    assert pope.parse_exact(text) == exact
    assert pope.parse_first_word(text) == first_word


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),  # ratio vs 'yes' 4/7, vs 'no' 0
        ("No", "no"),  # ratio vs 'no' 2/4, vs 'yes' 0
        ("Nope", "no"),  # 'no': 2/6 > 'yes': 2/7
        ("", "yes"),  # 0 = 0: tie goes to yes
    ],
)
def test_vicrop_parse(text: str, expected: str) -> None:
    assert pope.parse_vicrop(text) == expected


def _rows(variant: str, pairs: list[tuple[str, str]]) -> list[dict]:
    scorer = get_scorer("pope", variant)
    return [scorer.score_one(pred, {"label": label}) for label, pred in pairs]


def test_metrics_with_unknowns() -> None:
    pairs = [
        ("yes", "yes"),  # tp
        ("yes", "yes"),  # tp
        ("yes", "no"),  # fn
        ("yes", "maybe"),  # unknown on a positive: fn
        ("no", "no"),  # tn
        ("no", "yes"),  # fp
        ("no", "maybe"),  # unknown on a negative: wrong, neither tn nor fp
        ("no", "no"),  # tn
    ]
    rows = _rows("exact", pairs)
    assert [r["correct"] for r in rows] == [True, True, False, False, True, False, False, True]
    m = pope.aggregate(rows)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(400 / 7)  # 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7
    assert m["yes_ratio"] == pytest.approx(37.5)  # 3 of 8 predictions are yes; labels would say 50
    assert m["unknown"] == 2
    assert m["n"] == 8


def test_yes_ratio_comes_from_predictions() -> None:
    rows = _rows("canonical", [("yes", "Yes."), ("no", "Yes, I see one."), ("yes", "Yes"), ("no", "Yes")])
    m = pope.aggregate(rows)
    assert m["yes_ratio"] == pytest.approx(100.0)
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["precision"] == pytest.approx(50.0)
    assert m["recall"] == pytest.approx(100.0)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["unknown"] == 0


def test_no_yes_predictions_gives_zero_precision_and_f1() -> None:
    rows = _rows("canonical", [("yes", "No."), ("no", "No")])
    m = pope.aggregate(rows)
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 50.0)


def test_labels() -> None:
    score = get_scorer("pope").score_one
    assert score("No", {"answer": " No "})["correct"] is True  # 'answer' key, normalised label
    with pytest.raises(ValueError):
        score("No", {"label": "maybe"})
    with pytest.raises(KeyError):
        score("No", {})


@pytest.mark.parametrize(
    ("label", "answer", "parsed", "correct"),
    [
        ("yes", "Yes, there is a dog.", "yes", True),
        ("yes", "YES", "yes", True),  # lower-cased first
        ("yes", "No, there is not.", "no", False),
        ("yes", "eyes", "yes", True),  # 'yes' inside another word
        ("no", "No.", "no", True),
        ("no", "I don't know", "no", True),  # 'no' inside 'know' (canonical: yes)
        ("no", "Yes, there is one, no doubt.", "no", True),  # 'no' anywhere
        ("no", "There is a snowboard.", "no", True),  # 'no' inside 'snowboard'
        ("no", "Yes.", "yes", False),
        ("no", "", "yes", False),
    ],
)
def test_damro_vcd(label: str, answer: str, parsed: str, correct: bool) -> None:
    row = get_scorer("pope", "damro-vcd").score_one(answer, {"label": label})
    assert (row["parsed"], row["correct"]) == (parsed, correct)


def test_damro_vcd_metrics_count_like_vcds_script() -> None:
    scorer = get_scorer("pope", "damro-vcd")
    rows = [scorer.score_one(a, {"label": lab}) for lab, a in
            [("yes", "yes"), ("yes", "no"), ("no", "I don't know"), ("no", "yes")]]
    m = scorer.aggregate(rows)
    # tp=1 (yes/yes), fn=1, tn=1 (know), fp=1 -> yes answers = tp + fp = 2
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (50.0, 50.0, 50.0, 50.0)
    assert get_scorer("pope").score_one("I don't know", {"label": "no"})["correct"] is False
