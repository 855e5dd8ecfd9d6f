"""Smoke test of benchmarks/bench_vicrop.py at the smallest settings (``smoke`` shape, one
repetition, three tokens, in-process): the main table, the batch-scaling table and the pair-capture
memory, each through ``main``."""

from __future__ import annotations

import json

import pytest

SMOKE = ["--shape", "smoke", "--repeats", "1", "--tokens", "3", "--isolate", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def bench(benchmark_scripts):
    return benchmark_scripts("bench_vicrop")


def test_main_table(bench, smoke_table, capsys):
    rows = smoke_table(bench)
    assert list(rows) == list(bench.VARIANTS)
    # the shared prefix changes the cost, not the answer
    assert rows["rel-att"]["token_ids"] == rows["rel-att-joint"]["token_ids"]
    text = capsys.readouterr().out
    assert "load=" in text and "<= 2.00x" in text and "same answer tokens: True" in text


def test_scaling_and_capture_memory(bench, tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert bench.main([*SMOKE, "--scaling", "1,2", "--methods", "plain,rel-att", "--json", str(out)]) == 0
    scaling = json.loads(out.read_text())["scaling"]
    assert set(scaling) == {"plain", "rel-att"}
    assert all(v > 0 for m in scaling.values() for v in m.values()) and set(scaling["plain"]) == {"1", "2"}
    calls = json.loads(out.read_text())["calls"]
    assert len(calls["rel-att@2"][0]["token_ids"]) == 2 * 3  # two samples of three tokens
    out = tmp_path / "memory.json"
    assert bench.main([*SMOKE, "--capture-memory", "--json", str(out)]) == 0
    mem = json.loads(out.read_text())["capture_memory"]
    for name in ("plain-prefill", "capture-shared", "capture-joint"):
        assert mem[f"{name}_s"] > 0 and mem[f"{name}_mb"] >= 0
    assert "x plain prefill mem" in capsys.readouterr().out


def test_capture_memory_on_qwen2_vl(bench, tmp_path, capsys):
    """The Qwen2-VL capture-memory run (here a 112x112 image: 4 x 4 = 16 merged tokens; 1344 gives
    2304) measures the shared-prefix path, not the joint batch twice."""
    out = tmp_path / "memory.json"
    assert bench.main([*SMOKE, "--capture-memory", "--capture-family", "qwen2_vl", "--qwen-side", "112",
                       "--json", str(out)]) == 0
    mem = json.loads(out.read_text())["capture_memory"]
    assert mem["image_tokens"] == 16 and mem["shared_ran"] == 1.0
    for name in ("plain-prefill", "capture-shared", "capture-joint"):
        assert mem[f"{name}_s"] > 0 and mem[f"{name}_mb"] >= 0
    text = capsys.readouterr().out
    assert "family=qwen2_vl" in text and "shared_prefix_ran=True" in text
