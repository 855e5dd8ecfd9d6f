"""DocVQA ANLS and ViCrop's containment variant: hand-worked cases."""

from __future__ import annotations

import pytest

from innersight.eval.scorers import anls


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("ab", "ba", 2),
    ],
)
def test_levenshtein(a: str, b: str, d: int) -> None:
    assert anls.levenshtein(a, b) == d
    assert anls.levenshtein(b, a) == d


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("abc", ["abcd"], 0.75),  # NL 1/4
        ("ab", ["abcd"], 0.0),  # NL exactly 0.5 -> 0
        ("abcdef", ["abcdefghij"], 0.6),  # NL 0.4
        ("abcde", ["abcdefghij"], 0.0),  # NL 0.5
        ("  Hello   World ", ["hello world"], 1.0),  # lower / trim / collapse
        ("abc", ["xyz", "abcd"], 0.75),  # max over answers
        ("", [""], 1.0),
        ("", ["abc"], 0.0),
    ],
)
def test_anls(prediction: str, answers: list[str], expected: float) -> None:
    assert anls.anls(prediction, answers) == pytest.approx(expected)


def test_vicrop_containment() -> None:
    assert anls.vicrop_contains("ab", ["abc"])  # prediction inside answer
    assert anls.vicrop_contains("total: 12", ["12"])  # answer inside prediction
    assert not anls.vicrop_contains("ABC", ["abc"])  # case-sensitive
    assert not anls.vicrop_contains("xyz", ["abc", "def"])
    assert anls.vicrop_contains("", ["abc"])  # the reproduced bug


def test_empty_prediction_only_right_in_vicrop_variant() -> None:
    sample = {"answers": ["abc"]}
    assert anls.score_one("", sample)["anls"] == 0.0
    assert anls.score_one_vicrop("", sample)["correct"] is True


def test_score_one_and_aggregate() -> None:
    rows = [anls.score_one("ABC", {"answers": ["abcd"]}), anls.score_one("x", {"answers": ["x"]})]
    assert rows[0] == {"parsed": "abc", "anls": pytest.approx(0.75)}
    assert anls.aggregate(rows) == {"anls": pytest.approx(87.5), "n": 2}
    vrows = [anls.score_one_vicrop(p, {"answers": ["abc"]}) for p in ("ab", "x", "")]
    assert anls.aggregate_vicrop(vrows) == {"accuracy": pytest.approx(200 / 3), "n": 3}


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("x1", ["xy"], 0.5),  # distance 1 / length 2: similarity exactly 0.5 is kept (canonical: 0)
        (" X1 ", ["xy"], 0.75),  # distance of "x1"/"xy" = 1, divided by the raw length 4
        ("abc", ["ABC  "], 1.0),  # normalised strings equal: distance 0
        ("abcd", ["wxyz"], 0.0),  # similarity 0 < 0.5
        ("ab", ["abcde"], 0.0),  # 1 - 3/5 = 0.4 < 0.5
        ("abc", ["abcde", "zzz"], pytest.approx(0.6)),  # best answer: 1 - 2/5
        ("", [""], 1.0),  # both empty: distance 0
        ("Straße", ["strasse"], pytest.approx(1 - 2 / 7)),  # len("STRASSE") = 7 via upper()
    ],
)
def test_official_docvqa(prediction: str, answers: list[str], expected: float) -> None:
    assert anls.anls_official_docvqa(prediction, answers) == expected


def test_official_docvqa_variant_registered_and_differs_from_canonical() -> None:
    from innersight.eval.scorers import get_scorer

    official = get_scorer("docvqa", "official-docvqa")
    assert official.score_one("x1", {"answers": ["xy"]})["anls"] == 0.5
    assert get_scorer("docvqa").score_one("x1", {"answers": ["xy"]})["anls"] == 0.0
    assert official.aggregate([official.score_one("x1", {"answers": ["xy"]})]) == {"anls": 50.0, "n": 1}
