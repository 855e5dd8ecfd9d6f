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
