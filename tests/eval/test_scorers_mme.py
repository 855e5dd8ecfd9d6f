"""MME parsing, acc / acc+ and the perception / cognition sums: hand-worked cases."""

from __future__ import annotations

import pytest

from innersight.eval.scorers import mme

PERCEPTION = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        (" YES. ", "yes"),
        ("yes, it is", "yes"),
        ("Not at all", "no"),  # 'not ' contains 'no'
        ("nope", "no"),
        ("none", "no"),
        ("There is a dog", "other"),
        ("I don't know", "other"),
        ("y", "other"),
    ],
)
def test_parse(text: str, expected: str) -> None:
    assert mme.parse_yes_no(text) == expected


def _image(category: str, image: str, answers: list[tuple[str, str]]) -> list[dict]:
    """Rows for one image: (label, prediction) per question."""
    return [
        mme.score_one(pred, {"category": category, "image_id": image, "answer": label})
        for label, pred in answers
    ]


def test_acc_plus_needs_both_answers() -> None:
    rows = _image("existence", "a.jpg", [("yes", "Yes"), ("no", "No")])  # both right
    rows += _image("existence", "b.jpg", [("yes", "Yes"), ("no", "Yes")])  # second wrong
    rows += _image("existence", "c.jpg", [("yes", "No"), ("no", "No")])  # first wrong
    m = mme.aggregate(rows)
    assert m["existence/acc"] == pytest.approx(400 / 6)
    assert m["existence/acc_plus"] == pytest.approx(100 / 3)
    assert m["existence/score"] == pytest.approx(100.0)
    # a partial run reports no sums
    assert "perception" not in m and "hallucination" not in m and "total" not in m
    assert m["other"] == 0 and m["n"] == 6


def test_full_sums() -> None:
    perfect = [("yes", "yes"), ("no", "no")]
    rows = _image("existence", "e1", perfect) + _image("existence", "e2", [("yes", "yes"), ("no", "there")])
    for category in PERCEPTION[1:]:
        rows += _image(category.lower(), f"{category}1", perfect)  # category given in any case
    rows += _image("commonsense_reasoning", "c1", perfect)
    rows += _image("numerical_calculation", "n1", [("yes", "yes"), ("no", "yes")])  # 50 + 0
    rows += _image("text_translation", "t1", [("yes", "no"), ("no", "yes")])  # 0 + 0
    rows += _image("code_reasoning", "k1", perfect)
    m = mme.aggregate(rows)
    assert m["OCR/score"] == pytest.approx(200.0)
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["numerical_calculation/score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(9 * 200 + 125)
    assert m["cognition"] == pytest.approx(200 + 50 + 0 + 200)
    assert m["hallucination"] == pytest.approx(125 + 3 * 200)
    assert m["total"] == pytest.approx(1925 + 450)
    assert m["other"] == 1
    assert m["n"] == 2 * (len(PERCEPTION) + len(COGNITION)) + 2


def test_question_id_groups_and_unknown_subtask() -> None:
    rows = [
        mme.score_one("Yes", {"category": "color", "question_id": "color/1.jpg", "answer": "Yes"}),
        mme.score_one("Yes", {"category": "color", "question_id": "color/1.jpg", "answer": "No"}),
    ]
    m = mme.aggregate(rows)
    assert (m["color/acc"], m["color/acc_plus"]) == (50.0, 0.0)
    with pytest.raises(ValueError):
        mme.score_one("Yes", {"category": "weather", "image_id": "x", "answer": "yes"})


@pytest.mark.parametrize(
    ("text", "official", "lmms_eval"),
    [
        ("  yes", "other", "yes"),  # MME's script does not strip: "  ye" holds no "yes"
        ("...no", "other", "no"),  # nor delete periods: "...n" holds no "no"
        ("yes.", "yes", "yes"),  # prefix "yes." holds "yes"
        ("No", "no", "no"),
        (" no", "no", "no"),  # " no" (3 characters) holds "no"
        ("\nyes", "yes", "yes"),  # "\nyes"[:4] holds "yes"
        ("  No, it is not", "no", "no"),  # prefix "  no" holds "no"
        ("   No", "other", "no"),  # prefix "   n" does not
    ],
)
def test_official_parse_and_lmms_eval_variant(text: str, official: str, lmms_eval: str) -> None:
    assert mme.parse_yes_no(text) == official
    assert mme.parse_yes_no_lmms_eval(text) == lmms_eval
