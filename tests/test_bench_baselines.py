"""Smoke test of benchmarks/bench_baselines.py at the smallest settings (``smoke`` shape, one
repetition, three tokens, in-process, no peer): every baseline runs through ``main`` and says how
its negative branch ran (ICD's longer disturbed prompt packed, its serial variant serial)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMOKE = ["--shape", "smoke", "--repeats", "1", "--tokens", "3", "--isolate", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_baselines")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_baseline_runs_and_names_its_branch(bench, tmp_path, capsys):
    out = tmp_path / "baselines.json"
    assert bench.main([*SMOKE, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == list(bench.VARIANTS)
    for name, row in rows.items():
        assert row["steps"] == 3, name
        assert math.isfinite(row["x_plain_total"]) and row["total_s"] > 0, name
    assert rows["icd"]["info"]["branch"] == "batched" and rows["icd"]["info"]["negative_cache"] == "packed"
    assert rows["icd-serial"]["info"]["branch"] == "serial"
    assert rows["m3id-serial"]["info"]["branch"] == "serial"
    assert "batched packed" in capsys.readouterr().out
