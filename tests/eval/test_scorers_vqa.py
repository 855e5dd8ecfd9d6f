"""VQA answer normalisation and leave-one-out soft accuracy: hand-worked cases."""

from __future__ import annotations

import pytest

from innersight.eval.scorers import vqa
from innersight.eval.scorers.vqa import normalize_vqa_answer, soft_accuracy_normalized, vqa_soft_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("2 dogs", "2 dogs"),
        ("3.5", "3.5"),  # period between digits survives
        ("dogs.", "dogs"),
        ("5.", "5"),  # period not followed by a digit goes
        (".5", ".5"),  # reference quirk: only the next character is checked
        ("no.7", "no.7"),
        ("a.b", "ab"),
        ("the cat", "cat"),
        ("The Cat!", "cat"),
        ("an apple", "apple"),
        ("1,000", "1000"),  # comma between digits deleted
        ("red,blue", "red blue"),  # otherwise punctuation not touching a space becomes a space
        ("red, blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("co-op -", "coop"),  # '-' touches a space somewhere: deleted everywhere
        ("1000-2", "1000 2"),
        ("1,000-2", "10002"),  # a digit comma deletes every punctuation mark
        ("(a) cat", "cat"),
        ("yes/no", "yes no"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("wont", "won't"),
        ("Im", "im"),  # the reference's capitalised keys never fire after lower-casing
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("man's", "man's"),
        ("hello\nworld\t", "hello world"),
        ("  Yes  ", "yes"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def _answers(matches: int, n: int = 10) -> list[str]:
    return ["cat"] * matches + ["dog"] * (n - matches)


@pytest.mark.parametrize(
    ("matches", "expected"),
    # by hand: m*min(1,(m-1)/3)/10 + (10-m)*min(1,m/3)/10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (10, 1.0)],
)
def test_soft_accuracy_leave_one_out_hand_values(matches: int, expected: float) -> None:
    assert soft_accuracy_normalized("cat", _answers(matches)) == pytest.approx(expected)


def test_ten_answers_equal_min_one_point_three_m_but_not_min_m_over_3() -> None:
    for m in range(11):
        acc = soft_accuracy_normalized("cat", _answers(m))
        assert acc == pytest.approx(min(1.0, 0.3 * m))
        naive = min(1.0, m / 3)
        if m in (1, 2, 3):
            assert acc != pytest.approx(naive)
        else:
            assert acc == pytest.approx(naive)


def test_soft_accuracy_three_answers() -> None:
    # one match among 3: leaving out the match -> 0; leaving out either other -> 1/3
    assert soft_accuracy_normalized("cat", ["cat", "dog", "cow"]) == pytest.approx(2 / 9)
    # with fewer than 10 answers the 0.3*m shortcut does not hold
    assert soft_accuracy_normalized("cat", ["cat", "dog", "cow"]) != pytest.approx(0.3)


def test_soft_accuracy_needs_two_answers() -> None:
    with pytest.raises(ValueError):
        soft_accuracy_normalized("cat", ["cat"])


def test_normalisation_applies_to_both_sides() -> None:
    answers = ["2 dogs"] * 3 + ["two dogs"] + ["dogs"] * 6  # 4 normalise to "2 dogs"
    assert vqa_soft_accuracy("Two dogs.", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("the cat", ["cat", "Cat."] + ["dog"] * 8) == pytest.approx(0.6)


def test_score_one_and_aggregate() -> None:
    row = vqa.score_one("Two", {"answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8})
    assert row == {"parsed": "2", "matches": 2, "accuracy": pytest.approx(0.6)}
    row2 = vqa.score_one("three", {"answers": ["3"] * 8 + ["2"] * 2})
    assert row2["accuracy"] == pytest.approx(1.0)
    metrics = vqa.aggregate([row, row2])
    assert metrics == {"accuracy": pytest.approx(80.0), "n": 2}
    with pytest.raises(ValueError):
        vqa.aggregate([])
    with pytest.raises(TypeError):
        vqa.score_one("x", {"answers": "x"})


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Yes", ["yes"] * 10, 0.0),  # all answers identical: raw comparison, case matters
        ("yes.", ["yes"] * 10, 0.0),  # ... and punctuation matters
        (" yes\n", ["yes"] * 10, 1.0),  # whitespace is still cleaned
        ("Yes", ["yes"] * 9 + ["Yes"], 1.0),  # answers differ: everything normalised
        ("Two", ["2"] * 3 + ["two"] * 2 + ["3"] * 5, 1.0),  # normalised: 5 matches
        ("Two", ["two"] * 10, 0.0),  # identical answers: "Two" != "two"
        ("2", ["two"] * 10, 0.0),  # canonical would map "two" -> "2" and score 1
        ("dog", ["dog"] * 2 + ["cat"] * 8, pytest.approx(0.6)),  # soft accuracy as usual
    ],
)
def test_official_vqaeval(prediction: str, answers: list[str], expected: float) -> None:
    row = vqa.score_one_official(prediction, {"answers": answers})
    assert row["accuracy"] == expected


def test_official_vqaeval_registered_for_textvqa_and_vqav2() -> None:
    from innersight.eval.scorers import get_scorer

    for name in ("textvqa", "vqav2"):
        scorer = get_scorer(name, "official-vqaeval")
        assert scorer.score_one("Yes", {"answers": ["yes"] * 10})["accuracy"] == 0.0
        assert get_scorer(name).score_one("Yes", {"answers": ["yes"] * 10})["accuracy"] == 1.0
