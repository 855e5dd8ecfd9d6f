"""innersight report: intervals, paired tests, the matched-settings guard, controls, outputs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from innersight.eval.report import (
    MismatchedRunsError,
    analyse,
    csv_table,
    decoding_mode,
    markdown_table,
    write_report,
)
from innersight.eval.scorers import get_scorer


def pope_run(answers: list[str], labels: list[str], *, methods=(), model="m", gen=None, decoding=None, seed=0,
             errors=0, run="r"):
    """A results dict and its scored rows, through the real POPE scorer."""
    scorer = get_scorer("pope")
    rows = {f"q{i}": scorer.score_one(a, {"label": lab}) for i, (a, lab) in enumerate(zip(answers, labels))}
    metrics = scorer.aggregate(list(rows.values()))
    result = {
        "run": run, "benchmark": "pope", "split": "random", "data": {"path": "/d"}, "options": {},
        "scorer": {"name": "pope", "variant": "canonical"}, "preset": {"name": "default", "suffix": "", "prompt": None},
        "template": "chat", "model": model, "methods": list(methods), "generation": gen or {"max_new_tokens": 8},
        "seed": seed, "limit": None, "metrics": metrics,
        "main_metric": {"name": "accuracy", "value": metrics["accuracy"], "higher_is_better": True},
        "counts": {"samples": len(rows) + errors, "scored": len(rows), "errors": errors, "unknown": 0},
        "seconds_per_sample": 0.1 + 0.01 * len(methods),
    }
    if decoding is not None:
        result["decoding"] = decoding
    return result, rows


LABELS = ["yes", "no"] * 20
PLAIN = ["yes"] * 40  # right on every yes question only: 50 %, yes-ratio 100 %
BETTER = ["yes" if lab == "yes" else ("no" if i < 30 else "yes") for i, lab in enumerate(LABELS)]


def test_intervals_and_mcnemar_against_plain():
    plain, plain_rows = pope_run(PLAIN, LABELS)
    deco, deco_rows = pope_run(BETTER, LABELS, methods=["deco"])
    report = analyse([plain, deco], rows=[plain_rows, deco_rows], resamples=500)
    p, d = report.runs
    assert (p.label, d.label) == ("plain", "deco")
    assert p.value == 50.0 and p.yes_ratio == 100.0
    assert p.interval.low < 50.0 < p.interval.high
    # BETTER answers 'no' correctly on the 15 no-questions among the first 30: 15 discordant, all for deco
    assert d.value == pytest.approx(100 * 35 / 40)
    t = d.versus
    assert t.test == "mcnemar-exact" and t.discordant == (0, 15)
    assert t.p_value == pytest.approx(2 * 0.5 ** 15)
    assert t.difference == pytest.approx(100 * 15 / 40) and t.significant()
    table = markdown_table(report)
    assert "| deco | greedy | accuracy = 87.50 |" in table and "+37.50 [" in table and "] * |" in table
    assert "| 100.0 |" in table  # the yes-ratio control beside the score


def test_graded_scores_use_the_paired_bootstrap():
    scorer = get_scorer("textvqa")
    refs = [["a"] * 10 if i % 2 else ["b"] * 10 for i in range(20)]
    plain_rows = {f"q{i}": scorer.score_one("b", {"answers": r}) for i, r in enumerate(refs)}
    method_rows = {f"q{i}": scorer.score_one("a", {"answers": r}) for i, r in enumerate(refs)}
    results = []
    for methods, rows in (([], plain_rows), (["var"], method_rows)):
        metrics = scorer.aggregate(list(rows.values()))
        results.append({"run": "x", "benchmark": "textvqa", "split": "val", "scorer": {"name": "textvqa",
                        "variant": "canonical"}, "model": "m", "methods": methods, "generation": {"max_new_tokens": 8},
                        "seed": 0, "metrics": metrics, "main_metric": {"name": "accuracy",
                        "value": metrics["accuracy"], "higher_is_better": True},
                        "counts": {"samples": 20, "errors": 0}, "seconds_per_sample": 0.1})
    report = analyse(results, rows=[plain_rows, method_rows], resamples=300)
    t = report.runs[1].versus
    assert t.test == "paired-bootstrap"
    assert t.difference == pytest.approx(0.0)  # 'a' right on odd, 'b' right on even: both 50 %
    assert t.p_value > 0.05


def test_the_guard_refuses_mismatched_settings_and_lists_them():
    plain, plain_rows = pope_run(PLAIN, LABELS)
    other, other_rows = pope_run(BETTER, LABELS, methods=["deco"], model="other", gen={"max_new_tokens": 32}, seed=3)
    with pytest.raises(MismatchedRunsError) as info:
        analyse([plain, other], rows=[plain_rows, other_rows])
    message = str(info.value)
    for needle in ("model: plain (m)=m; deco (other)=other", "max_new_tokens: plain (m)=8; deco (other)=32",
                   "seed: plain (m)=0; deco (other)=3", "--allow-mismatch"):
        assert needle in message
    assert "split" not in message and "template" not in message
    report = analyse([plain, other], rows=[plain_rows, other_rows], allow_mismatch=True, resamples=100)
    assert not report.runs[1].matched and report.runs[1].versus is not None
    assert "(unmatched)" in markdown_table(report) and "WARNING: pope (greedy)" in markdown_table(report)


@pytest.mark.parametrize("field, value", [("split", "adversarial"), ("template", "reference"),
                                          ("data", {"path": "/other"}), ("limit", 20)])
def test_each_guarded_setting_is_checked(field, value):
    plain, plain_rows = pope_run(PLAIN, LABELS)
    deco, deco_rows = pope_run(BETTER, LABELS, methods=["deco"])
    deco[field] = value
    with pytest.raises(MismatchedRunsError, match={"limit": "samples", "split": "split", "template": "template",
                                                    "data": "data"}[field]):
        analyse([plain, deco], rows=[plain_rows, deco_rows])


def test_greedy_and_sampled_runs_are_separate_groups_and_a_control():
    sampling = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0}
    runs = [pope_run(PLAIN, LABELS), pope_run(BETTER, LABELS, methods=["deco"]),
            pope_run(PLAIN, LABELS, gen=sampling), pope_run(PLAIN, LABELS, methods=["deco"], gen=sampling)]
    report = analyse([r for r, _ in runs], rows=[rows for _, rows in runs], resamples=100)
    assert [r.mode for r in report.runs] == ["greedy", "greedy", "sampling", "sampling"]
    assert report.runs[3].versus_label == "plain" and report.runs[3].versus.difference == 0.0
    (control,) = report.controls
    assert control["greedy"]["difference"] == pytest.approx(37.5) and control["sampling"]["difference"] == 0.0
    assert "| pope/random | deco | 87.50 | 37.50 | 50.00 | 0.00 |" in markdown_table(report)
    # a different temperature inside the sampling group is a mismatch
    hotter = pope_run(PLAIN, LABELS, methods=["vcd"], gen={**sampling, "temperature": 0.7})
    with pytest.raises(MismatchedRunsError, match="sampling: "):
        analyse([r for r, _ in runs] + [hotter[0]], rows=[rows for _, rows in runs] + [hotter[1]])


def test_a_method_that_samples_by_itself_counts_as_sampling():
    official = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_k": 0}
    result, _ = pope_run(PLAIN, LABELS, methods=["damro"], decoding=official)
    assert decoding_mode(result) == "sampling"
    assert decoding_mode(pope_run(PLAIN, LABELS)[0]) == "greedy"


def test_repeats_failed_samples_and_all_outputs(tmp_path):
    runs = [pope_run(PLAIN, LABELS, run="a"), pope_run(BETTER, LABELS, methods=["deco"], run="b"),
            pope_run(BETTER[:-2], LABELS[:-2], methods=["deco"], errors=2, run="c")]
    # failed samples are no setting: the same command with two failures is still a matched run
    report = analyse([r for r, _ in runs], rows=[rows for _, rows in runs], resamples=100)
    assert [r.label for r in report.runs] == ["plain", "deco #1", "deco #2"]
    assert report.runs[2].versus.n == 38
    table = markdown_table(report)
    assert "2 sample(s) failed and are not scored" in table and "paired on the 38 samples" in table
    paths = write_report(report, tmp_path / "out" / "cmp.png")
    with Image.open(paths["figure"]) as png:
        assert png.format == "PNG" and png.size[0] > 400
    parsed = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [row["label"] for row in parsed] == ["plain", "deco #1", "deco #2"]
    assert float(parsed[1]["ci_low"]) < float(parsed[1]["value"]) < float(parsed[1]["ci_high"])
    assert parsed[1]["test"] == "mcnemar-exact" and parsed[1]["significant"] == "True"
    data = json.loads(paths["json"].read_text())
    assert data["runs"][2]["errors"] == 2 and data["runs"][1]["paired"]["discordant"] == [0, 15]
    assert paths["table"].read_text() == table
    assert csv_table(report) == paths["csv"].read_text()


def test_intervals_are_reproducible_and_depend_on_the_seed():
    plain, rows = pope_run(BETTER, LABELS)
    a = analyse([plain], rows=[rows], seed=1, resamples=200).runs[0].interval
    b = analyse([plain], rows=[rows], seed=1, resamples=200).runs[0].interval
    assert a == b and a.seed == 1 and a.resamples == 200


def test_micro_chair_runs_get_intervals_and_a_paired_bootstrap():
    scorer = get_scorer("micro-chair")
    scenes = [["star", "circle"], ["square"], ["triangle", "star"], ["circle"]] * 5
    plain_text = ["a red star and a blue triangle", "a green square", "a red triangle", "a blue circle"] * 5
    method_text = ["a red star", "a green square", "a red triangle and a red star", "a blue circle"] * 5
    results, rows = [], []
    for methods, texts in (([], plain_text), (["deco"], method_text)):
        scored = {f"s{i}": scorer.score_one(t, {"gt_objects": g}) for i, (t, g) in enumerate(zip(texts, scenes))}
        metrics = scorer.aggregate(list(scored.values()))
        results.append({"run": "x", "benchmark": "micro-chair", "split": "val", "model": "micro", "methods": methods,
                        "scorer": {"name": "micro-chair", "variant": "canonical"}, "generation": {"max_new_tokens": 48},
                        "seed": 0, "metrics": metrics, "counts": {"samples": 20, "errors": 0},
                        "main_metric": {"name": "chair_s", "value": metrics["chair_s"], "higher_is_better": False},
                        "seconds_per_sample": 0.05})
        rows.append(scored)
    report = analyse(results, rows=rows, resamples=300)
    plain, deco = report.runs
    assert plain.value == pytest.approx(25.0) and deco.value == 0.0  # 5 of 20 captions name an absent triangle
    assert plain.interval.low < 25.0 < plain.interval.high and deco.interval.high == 0.0
    assert deco.versus.test == "paired-bootstrap" and deco.versus.difference == pytest.approx(-25.0)
    assert deco.versus.significant()


def test_runs_at_the_same_place_are_spread_apart_in_the_plot():
    from innersight.eval.report import _dodged

    runs = [pope_run(PLAIN, LABELS), pope_run(BETTER, LABELS, methods=["deco"]),
            pope_run(BETTER, LABELS, methods=["deco"]), pope_run(BETTER, LABELS, methods=["var"])]
    for result, _ in runs:
        result["seconds_per_sample"] = 0.1
    report = analyse([r for r, _ in runs], rows=[rows for _, rows in runs], resamples=20)
    xs = _dodged(report.runs)
    assert xs[0] == 0.1 and xs[1] == 0.1  # plain (50) and deco (87.5) are far apart in score
    assert len({round(x, 9) for x in xs[1:]}) == 3  # three runs at 87.5: three x positions


def test_results_record_the_decoding_a_method_imposes(tmp_path):
    import innersight
    from innersight.eval.report import load_results
    from innersight.eval.runner import evaluate

    mllm = innersight.load("micro")
    common = {"options": {"n": 4}, "progress": False}
    greedy = evaluate(mllm, "micro-pope", None, "random", [], None, tmp_path / "g", None, 4, 0,
                      {"max_new_tokens": 3}, **common)
    sampled = evaluate(mllm, "micro-pope", None, "random", [], None, tmp_path / "s", None, 4, 0,
                       {"max_new_tokens": 3, "do_sample": True, "temperature": 1.0}, **common)
    official = evaluate(mllm, "micro-pope", None, "random", ["damro"], {"damro": {"preset": "official"}},
                        tmp_path / "d", None, 4, 0, {"max_new_tokens": 3}, **common)
    assert greedy["decoding"] == {"max_new_tokens": 3}
    assert official["generation"] == {"max_new_tokens": 3} and official["decoding"]["do_sample"] is True
    assert [decoding_mode(r) for r in (greedy, sampled, official)] == ["greedy", "sampling", "sampling"]
    report = analyse([load_results(tmp_path / n) for n in ("g", "s")], resamples=20)
    assert [r.mode for r in report.runs] == ["greedy", "sampling"] and report.runs[1].versus is None
    # DAMRO's official preset samples with top_k=0 etc.; a plain run at temperature 1 does not match it
    with pytest.raises(MismatchedRunsError, match="sampling: "):
        analyse([load_results(tmp_path / n) for n in ("s", "d")], resamples=20)
