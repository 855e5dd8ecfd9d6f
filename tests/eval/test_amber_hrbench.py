"""AMBER and HR-Bench: loaders over tiny copies of the official layouts, hand-worked scores."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from innersight.errors import UserInputError
from innersight.eval.benchmarks import get_benchmark
from innersight.eval.scorers import get_scorer
from innersight.eval.scorers.amber import object_mentions
from innersight.eval.scorers.hrbench import parse_letter

RELATION = {"dog": ["puppy"], "cat": ["kitten"], "car": ["vehicle"], "tree": [], "sky": [], "man": ["person"]}


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_amber(root: Path) -> Path:
    data = root / "data"
    (data / "query").mkdir(parents=True)
    (root / "image").mkdir()
    for i in (1, 2):
        _png(i).save(root / "image" / f"AMBER_{i}.jpg")
    annotations = [
        {"id": 1, "type": "generative", "truth": ["dog", "tree"], "hallu": ["cat", "car"]},
        {"id": 2, "type": "generative", "truth": ["sky", "sky"], "hallu": ["dog"]},
        {"id": 3, "type": "discriminative-hallucination", "truth": "yes"},
        {"id": 4, "type": "discriminative-attribute-state", "truth": "no"},
        {"id": 5, "type": "discriminative-attribute-number", "truth": "no"},
        {"id": 6, "type": "discriminative-relation", "truth": "yes"},
        {"id": 7, "type": "discriminative-hallucination", "truth": "no"},
    ]
    (data / "annotations.json").write_text(json.dumps(annotations))
    (data / "relation.json").write_text(json.dumps(RELATION))
    (data / "safe_words.txt").write_text("vehicle\n")
    gen = [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
           {"id": 2, "image": "AMBER_2.jpg", "query": "Describe this image."}]
    disc = [{"id": i, "image": f"AMBER_{1 + i % 2}.jpg", "query": f"Question {i}?"} for i in range(3, 8)]
    (data / "query" / "query_generative.json").write_text(json.dumps(gen))
    (data / "query" / "query_discriminative.json").write_text(json.dumps(disc))
    (data / "query" / "query_discriminative-existence.json").write_text(json.dumps([disc[0], disc[4]]))
    return root


def test_amber_generative_hand_worked(tmp_path):
    samples = get_benchmark("amber-g").load(make_amber(tmp_path), "generative")
    assert [s["id"] for s in samples] == ["1", "2"] and samples[0]["question"] == "Describe this image."
    assert Path(samples[0]["image"]).name == "AMBER_1.jpg"
    scorer = get_scorer("amber-g")
    text = "A puppy sits under a tree next to two cats and a vehicle. The dog is happy and the man waves."
    assert object_mentions(text, samples[0]["vocabulary"]) == ["puppy", "tree", "cat", "vehicle", "dog", "man"]
    first = scorer.score_one(text, samples[0])
    # puppy -> dog (truth 0), tree (truth 1), cat: a hallu object -> hallucinated and Cog,
    # vehicle: a safe word (mention, never hallucinated), dog (truth 0 again), man: hallucinated
    assert (first["n_mentions"], first["n_hallucinated"], first["covered"], first["hallu_mentioned"]) == (6, 2, 2, 1)
    assert first["hallucinated"] == ["cat", "man"]
    # 'Sky' (capital) is not the vocabulary's 'sky'; the duplicated truth 'sky' is covered once
    second = scorer.score_one("Sky. The sky is blue.", samples[1])
    assert (second["n_mentions"], second["n_hallucinated"], second["covered"], second["n_truth"]) == (1, 0, 1, 2)
    metrics = scorer.aggregate([first, second])
    assert metrics["chair"] == pytest.approx(100 * 2 / 7)
    assert metrics["cover"] == pytest.approx(100 * 3 / 4)
    assert metrics["hal"] == pytest.approx(50.0)
    assert metrics["cog"] == pytest.approx(100 * 1 / 3)
    assert get_benchmark("amber-g").main_metric(metrics) == "chair"


def test_amber_discriminative_hand_worked(tmp_path):
    root = make_amber(tmp_path)
    samples = get_benchmark("amber-d").load(root, "all")
    assert [s["dimension"] for s in samples] == ["existence", "attribute", "attribute", "relation", "existence"]
    assert [s["label"] for s in samples] == ["yes", "no", "no", "yes", "no"]
    answers = ["Yes", "No", "Yes", "No", "no."]
    canonical = get_scorer("amber-d")
    rows = [canonical.score_one(a, s) for a, s in zip(answers, samples)]
    assert [r["parsed"] for r in rows] == ["yes", "no", "yes", "no", "unknown"]
    m = canonical.aggregate(rows)
    assert m["accuracy"] == pytest.approx(40.0)
    assert m["precision"] == pytest.approx(50.0)  # 'No' answered twice, right once
    assert m["recall"] == pytest.approx(100 / 3)  # three 'no' truths, one answered 'No'
    assert m["f1"] == pytest.approx(100 * 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3 + 0.0001))
    assert m["yes_ratio"] == pytest.approx(40.0) and m["unknown"] == 1
    assert (m["existence_accuracy"], m["attribute_accuracy"], m["relation_accuracy"]) == (50.0, 50.0, 0.0)
    lenient = get_scorer("amber-d", "first_word").aggregate(
        [get_scorer("amber-d", "first_word").score_one(a, s) for a, s in zip(answers, samples)])
    assert lenient["accuracy"] == pytest.approx(60.0) and lenient["precision"] == pytest.approx(200 / 3)
    existence = get_benchmark("amber-d").load(root, "existence")
    assert [s["id"] for s in existence] == ["3", "7"]


def test_amber_layout_errors_are_one_line(tmp_path):
    root = make_amber(tmp_path)
    (root / "data" / "relation.json").unlink()
    with pytest.raises(UserInputError, match="relation.json"):
        get_benchmark("amber-g").load(root, "generative")
    with pytest.raises(UserInputError, match="query_discriminative-relation.json"):
        get_benchmark("amber-d").load(root, "relation")
    notes = json.loads((root / "data" / "annotations.json").read_text())
    (root / "data" / "annotations.json").write_text(json.dumps(notes[1:]))
    with pytest.raises(UserInputError, match="out of order"):
        get_benchmark("amber-d").load(root, "all")


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


HR_ROWS = [  # index, cycle, category, answer, options, the model's answer
    (1, 0, "single", "A", ("red", "blue", "green", "pink"), "A. red"),
    (2, 0, "cross", "C", ("up", "down", "left", "right"), "(C) left"),
    (3, 1, "single", "B", ("pink", "red", "blue", "green"), "red"),
    (4, 1, "cross", "D", ("right", "up", "down", "left"), "I think it is B or maybe D"),
]


def make_hrbench(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    header = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\timage\tcycle_category\n"
    lines = [f"{i}\tWhat is it {i}?\t{ans}\t{cat}\t" + "\t".join(opts) + f"\t{_b64(_png(i, (64, 48)))}\t{cyc}\n"
             for i, cyc, cat, ans, opts, _ in HR_ROWS]
    (root / "hr_bench_4k.tsv").write_text(header + "".join(lines))
    return root


def test_hrbench_hand_worked(tmp_path):
    bench = get_benchmark("hrbench")
    samples = bench.load(make_hrbench(tmp_path), "4k")
    assert [s["id"] for s in samples] == ["4k-1", "4k-2", "4k-3", "4k-4"]
    question, _ = bench.render(samples[0], bench.preset())
    assert question == "What is it 1?\nA. red\nB. blue\nC. green\nD. pink\nAnswer the option letter directly."
    from innersight.images import load_image

    assert load_image(samples[0]["image"]).size == (64, 48)
    assert load_image(samples[0]["image"]).size == (64, 48)  # can be read again
    scorer = get_scorer("hrbench")
    rows = [scorer.score_one(row[5], s) for row, s in zip(HR_ROWS, samples)]
    assert [r["parsed"] for r in rows] == ["A", "C", "B", "unknown"]
    m = scorer.aggregate(rows)
    # cycle 0: 2/2 right, cycle 1: 1/2 -> mean 75; single 100 and 100 -> 100; cross 100 and 0 -> 50
    assert (m["accuracy"], m["single"], m["cross"], m["cycles"], m["unknown"]) == (75.0, 100.0, 50.0, 2, 1)


@pytest.mark.parametrize("text, expected", [("B", "B"), ("b", "unknown"), ("(D)", "D"), ("C: left", "C"),
                                            ("Blue.", "B"), ("B or D", "unknown"), ("Answer: D", "D"), ("", "unknown"),
                                            ("A red one", "unknown"), ("A", "A"), ("A. red", "A"),
                                            ("The answer is A", "A")])
def test_hrbench_letter_parsing(text, expected):
    assert parse_letter(text, {"A": "red", "B": "blue", "C": "green", "D": "pink"}) == expected


def test_hrbench_layout_errors(tmp_path):
    with pytest.raises(UserInputError, match="hr_bench_8k.tsv"):
        get_benchmark("hrbench").load(make_hrbench(tmp_path), "8k")
    (tmp_path / "hr_bench_4k.tsv").write_text("index\tquestion\n1\tq\n")
    with pytest.raises(UserInputError, match="lacks column"):
        get_benchmark("hrbench").load(tmp_path, "4k")


def test_new_benchmarks_run_through_the_runner(tmp_path):
    import innersight
    from innersight.eval.report import analyse, load_results
    from innersight.eval.runner import evaluate

    mllm = innersight.load("micro")
    hr = evaluate(mllm, "hrbench", make_hrbench(tmp_path / "hr"), "4k", [], None, tmp_path / "run-hr", None, 2, 0,
                  {"max_new_tokens": 3}, progress=False)
    assert hr["counts"] == {"samples": 4, "scored": 4, "errors": 0, "unknown": hr["counts"]["unknown"]}
    assert hr["main_metric"]["name"] == "accuracy"
    amber = evaluate(mllm, "amber-d", make_amber(tmp_path / "amber"), "all", [], None, tmp_path / "run-amber", None,
                     3, 0, {"max_new_tokens": 3}, progress=False)
    assert amber["counts"]["errors"] == 0 and "yes_ratio" in amber["metrics"]
    report = analyse([load_results(tmp_path / "run-hr"), load_results(tmp_path / "run-amber")], resamples=50)
    assert all(r.interval is not None for r in report.runs)
    assert report.runs[1].yes_ratio == amber["metrics"]["yes_ratio"]
