"""`innersight demo` end to end on a tiny slice, with its default model: the micro model shipped in the package."""

from __future__ import annotations

import json

import pytest

from innersight.cli import main
from innersight.demo.run import DEFAULT_METHODS, SETS, is_correct


def test_answer_checks():
    assert is_correct("read", " 7. ", "7")
    assert not is_correct("read", "17", "7")
    assert is_correct("exist", "No, there is not.", "no")
    assert is_correct("exist", "yes", "yes") and not is_correct("exist", "there is no star", "yes")


def test_demo_writes_table_report_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    try:
        main(["demo", "--n", "2", "-o", str(out), "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == "micro"
    assert set(payload["accuracy"]) == {s.name for s in SETS}
    for accs in payload["accuracy"].values():
        assert set(accs) == {"plain", *DEFAULT_METHODS}
        assert all(0.0 <= v <= 1.0 for v in accs.values())
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2  # one card per read-small scene
    assert "with ViCrop rel-att" in report
    assert json.loads((out / "results.json").read_text())["n_per_set"] == 2


def test_demo_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--n", "1", "--method", "nope", "-o", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown method" in capsys.readouterr().err


def test_demo_statistics_are_mcnemar_and_bootstrap_on_the_same_scenes():
    from innersight.demo.run import DemoResult, add_statistics, markdown_table

    result = DemoResult("micro", 10, 0, ("deco",))
    plain = [True] * 2 + [False] * 8
    deco = [True] * 10  # 8 scenes plain got wrong, none the other way: exact p = 2 / 2**8
    for demo_set in SETS:
        result.correct[demo_set.name] = {"plain": plain, "deco": deco if demo_set.name == "read-small" else plain}
        result.accuracy[demo_set.name] = {r: sum(v) / 10 for r, v in result.correct[demo_set.name].items()}
    add_statistics(result, resamples=200)
    test = result.versus_plain["read-small"]["deco"]
    assert test.discordant == (0, 8) and test.p_value == pytest.approx(2 / 2**8)
    assert result.significant("read-small", "deco") and not result.significant("pope", "deco")
    interval = result.intervals["read-small"]["plain"]
    assert interval.low < 20.0 < interval.high and interval.low >= 0.0
    assert result.intervals["read-small"]["deco"].low == 100.0  # every resample of all-correct is 100
    table = markdown_table(result)
    assert "| **100.0**\\* [100.0, 100.0] |" in table and "| 20.0 [" in table
    assert json.loads(json.dumps(result.to_json()))["versus_plain"]["read-small"]["deco"]["discordant"] == [0, 8]


def test_demo_table_prints_intervals_and_marks(tmp_path, capsys):
    try:
        main(["demo", "--n", "3", "--method", "vicrop-rel-att", "-o", str(tmp_path / "d")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "95% interval" in out and "McNemar p < 0.05" in out
    assert out.count("[") >= 2 * len(SETS)  # an interval under every accuracy
    table = (tmp_path / "d" / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| method | " + " | ".join(s.description for s in SETS) + " |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| plain", "| vicrop-rel-att"]  # one row per run
    assert all(line.count(" | ") == len(SETS) for line in lines[2:])


def test_demo_runs_the_papers_methods_the_gate_and_every_baseline_by_default():
    """Issue #18: the demo table includes the training-free baselines and the crop gate."""
    from innersight.methods import resolve_methods

    for name in ("vicrop-rel-att", "vicrop-grad-att", "vicrop-pure-grad", "vicrop-gated", "deco", "damro", "var",
                 "dola", "vcd", "pai", "m3id", "icd", "vista", "only"):
        assert name in DEFAULT_METHODS
    assert len(set(DEFAULT_METHODS)) == len(DEFAULT_METHODS)
    for name in DEFAULT_METHODS:
        resolve_methods([name])  # each a registered method
