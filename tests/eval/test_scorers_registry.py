"""The scorer registry: keys, lookup, metric directions, JSON rows, no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from innersight.eval.scorers import SCORERS, Scorer, get_scorer, variants

EXAMPLES: dict[str, list[tuple[object, dict]]] = {
    "textvqa": [("two", {"answers": ["2"] * 10})],
    "vqav2": [("two", {"answers": ["2"] * 10})],
    "aokvqa": [("two", {"answers": ["2"] * 10})],
    "pope": [("Yes", {"label": "yes"}), ("maybe", {"label": "no"})],
    "docvqa": [("abc", {"answers": ["abc"]})],
    "gqa": [("man", {"answer": "man"})],
    "micro-details": [("7", {"answer": "7"}), ("a", {"answer": "b"})],
    "mme": [
        (p, {"category": c, "image_id": f"{c}-{i}", "answer": p})
        for c in (
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
            "commonsense_reasoning",
            "numerical_calculation",
            "text_translation",
            "code_reasoning",
        )
        for i in range(2)
        for p in ("yes", "no")
    ],  # fmt: skip
    "vstar": [
        ("A", {"options": ["x", "y"], "category": "direct_attributes"}),
        ("B", {"options": ["x", "y"]}),
    ],
    "chair": [("a dog", {"gt_objects": ["dog"]})],
    "micro-chair": [("a red star and a blue circle", {"gt_objects": ["star"]}),
                    ("a green square with 4", {"gt_objects": ["square", "letter"]})],
    "amber-g": [("a dog and two cats", {"truth": ["dog"], "hallu": ["cat"], "association": {"dog": [], "cat": []},
                                        "vocabulary": frozenset({"dog", "cat"}), "safe_words": frozenset()})],
    "amber-d": [("Yes", {"label": "yes", "dimension": "existence"}),
                ("no", {"label": "no", "dimension": "relation"})],
    "hrbench": [("B", {"options": {"A": "x", "B": "y"}, "answer": "B", "category": "single", "cycle_category": "0"}),
                ("A", {"options": {"A": "x", "B": "y"}, "answer": "B", "category": "cross", "cycle_category": "1"})],
}


def test_expected_keys() -> None:
    assert set(SCORERS) == {
        "textvqa/canonical", "vqav2/canonical", "aokvqa/canonical",
        "textvqa/official-vqaeval", "vqav2/official-vqaeval",
        "pope/canonical", "pope/substring", "pope/exact", "pope/first_word", "pope/vicrop", "pope/damro-vcd",
        "docvqa/canonical", "docvqa/official-docvqa", "docvqa/vicrop", "gqa/canonical", "gqa/vicrop",
        "mme/canonical", "mme/lmms-eval",
        "vstar/canonical", "vstar/letter", "vstar/vicrop", "chair/canonical", "chair/lemma", "chair/tidy",
        "micro-chair/canonical", "amber-g/canonical", "amber-d/canonical", "amber-d/first_word",
        "hrbench/canonical", "micro-details/canonical",
    }  # fmt: skip
    for key, scorer in SCORERS.items():
        assert key == scorer.key == f"{scorer.name}/{scorer.variant}"
        assert scorer.description


def test_lookup() -> None:
    assert get_scorer("pope").variant == "canonical"
    assert get_scorer("docvqa", "vicrop").name == "docvqa"
    assert variants("pope") == ["canonical", "damro-vcd", "exact", "first_word", "substring", "vicrop"]
    with pytest.raises(KeyError, match="variants: canonical"):
        get_scorer("pope", "nope")
    with pytest.raises(KeyError, match="benchmarks:"):
        get_scorer("imagenet")


def test_scorer_is_frozen_and_validated() -> None:
    scorer = get_scorer("gqa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        scorer.variant = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        scorer.higher_is_better["accuracy"] = False  # type: ignore[index]
    with pytest.raises(ValueError):
        Scorer("x", "canonical", {}, scorer.score_one, scorer.aggregate, prediction="image")


@pytest.mark.parametrize("key", sorted(SCORERS))
def test_every_scorer_rows_are_json_and_metrics_have_directions(key: str) -> None:
    scorer = SCORERS[key]
    if scorer.missing():
        pytest.skip(f"{key} needs the optional {', '.join(scorer.missing())} (CI installs it)")
    rows = []
    for prediction, sample in EXAMPLES[scorer.name]:
        if scorer.prediction == "option_losses":
            prediction = [0.5] + [1.0] * (len(sample["options"]) - 1)
        rows.append(scorer.score_one(prediction, sample))
    # rows survive a JSONL round trip and aggregate the same afterwards
    restored = [json.loads(json.dumps(r)) for r in rows]
    metrics = scorer.aggregate(restored)
    assert metrics == scorer.aggregate(rows)
    assert metrics["n"] == len(rows)
    assert set(metrics) <= set(scorer.higher_is_better)
    json.dumps(metrics)


def test_import_is_torch_free() -> None:
    code = "import sys, innersight.eval.scorers; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
