"""Smoke test of benchmarks/bench_baselines.py at the smallest settings (``smoke`` shape, one
repetition, three tokens, in-process, no peer): every baseline runs through ``main`` and says how
its negative branch ran (ICD's longer disturbed prompt packed, its serial variant serial)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_scripts):
    return benchmark_scripts("bench_baselines")


def test_every_baseline_runs_and_names_its_branch(bench, smoke_table, capsys):
    rows = smoke_table(bench)
    assert list(rows) == list(bench.VARIANTS)
    assert rows["icd"]["info"]["branch"] == "batched" and rows["icd"]["info"]["negative_cache"] == "packed"
    assert rows["icd-serial"]["info"]["branch"] == "serial"
    assert rows["m3id-serial"]["info"]["branch"] == "serial"
    assert "batched packed" in capsys.readouterr().out
