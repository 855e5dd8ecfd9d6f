"""Smoke tests of benchmarks/bench_decoding.py and benchmarks/bench_var.py: their harness (step
timer, peak memory, the eager reference's probabilities) on hand-made cases, and each script's
``main`` at the smallest settings (``smoke`` shape, one repetition, three tokens, in-process)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

SMOKE = ["--shape", "smoke", "--repeats", "1", "--tokens", "3", "--isolate", "none", "--threads", "1"]
TOKENS = 3


@pytest.fixture(scope="module")
def bench(benchmark_scripts):
    """The two benchmark scripts, imported as modules."""
    return benchmark_scripts("bench_decoding"), benchmark_scripts("bench_var")


# ---------------------------------------------------------------------- the harness
def test_timed_reads_steps_from_the_stopping_criteria(bench):
    decoding, _ = bench

    def call(extra):
        (criteria,) = extra["stopping_criteria"]
        ids = torch.zeros(1, 5, dtype=torch.long)
        time.sleep(0.05)  # "prefill"
        for _ in range(4):
            assert not bool(criteria(ids, None).any())  # never stops generation
            time.sleep(0.02)
        return [7, 8, 9, 10], {"note": 1}

    m = decoding.timed(call, "cpu")
    assert m.steps == 4 and m.token_ids == [7, 8, 9, 10] and m.info == {"note": 1}
    assert 0.05 <= m.first_s < 0.2
    assert 0.02 <= m.per_token_s < 0.08  # three gaps of one 20 ms sleep each
    assert m.total_s >= m.first_s + 3 * 0.02


def test_peak_memory_sees_a_large_allocation_on_cpu(bench):
    decoding, _ = bench

    def call(extra):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
        extra["stopping_criteria"][0](torch.zeros(1, 1, dtype=torch.long), None)
        return [int(block[0])], {}

    m = decoding.timed(call, "cpu")
    assert 56 <= m.peak_mb < 200
    assert math.isnan(m.per_token_s)  # one step: no decoding gap


def test_eager_probs_are_causal_softmax_rows(bench):
    _, var = bench
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)  # 3 queries at positions 2, 3, 4 of 5 keys
    probs = var.eager_probs(q, k, None, 0.5)  # [1, 2, 3, 5]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5
    for row, pos in enumerate((2, 3, 4)):
        expected = torch.softmax(logits[:, :, row, : pos + 1], dim=-1)
        torch.testing.assert_close(probs[:, :, row, : pos + 1], expected)
        assert float(probs[:, :, row, pos + 1:].abs().sum()) == 0.0
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 0] = False  # a padded first key
    masked = var.eager_probs(q, k, mask, 0.5)
    torch.testing.assert_close(masked[..., 1:], torch.softmax(logits[..., 1:], dim=-1))
    assert float(masked[..., 0].sum()) == 0.0


def test_planted_tokens_pass_tau_and_random_ones_do_not(bench):
    _, var = bench
    for hidden in (64, 256, 4096):
        assert var.plant_tau(hidden) < math.sqrt(hidden / 2)  # the planted tokens' phi
        assert var.plant_tau(hidden) > 4.0  # above a random Gaussian token's max |x| / RMS at these widths
        dims = var.plant_dims(hidden)
        assert dims[0] != dims[1] and max(dims) < hidden


# ---------------------------------------------------------------------- the scripts' main
def _finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_decoding_main(bench, tmp_path, capsys):
    decoding, _ = bench
    out = tmp_path / "decoding.json"
    assert decoding.main([*SMOKE, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert list(rows) == list(decoding.VARIANTS)
    for name, row in rows.items():
        assert row["steps"] == TOKENS, name  # min_new_tokens forced the full length
        assert len(data["calls"][name]) == 1
        for key in ("first_s", "per_token_s", "total_s", "x_plain_first", "x_plain_per_token", "x_plain_total"):
            assert _finite(row[key]), (name, key, row[key])
    assert rows["plain"]["x_plain_per_token"] == 1.0
    assert rows["deco"]["x_plain_per_token"] == pytest.approx(rows["deco"]["per_token_s"] / rows["plain"]["per_token_s"])
    # the negative branch really ran as asked: prefill + one forward per later token
    for name, mode in (("damro", "batched"), ("damro-serial", "serial"), ("vcd", "batched"), ("vcd-serial", "serial"),
                       ("damro-padded", "batched"), ("vcd-padded", "batched")):
        expected = {"branch": mode, "negative_forwards": TOKENS}
        if mode == "batched":
            expected["negative_cache"] = "padded" if name.endswith("-padded") else "packed"
        assert rows[name]["info"] == expected, name
    for name, pair in data["serial"].items():
        ser = decoding.SERIAL_PAIRS[name]
        assert pair["per_token"] == pytest.approx(rows[name]["per_token_s"] / rows[ser]["per_token_s"])
        assert _finite(pair["total"]) and isinstance(pair["same_tokens"], bool)
    text = capsys.readouterr().out
    assert "<= 1.10x" in text and "<= 1.50x" in text
    assert "damro batched / serial negative branch" in text and "vcd batched / serial negative branch" in text
    assert "damro packed / padded negative cache" in text and "vcd packed / padded negative cache" in text
    assert rows["damro"]["token_ids"] == rows["damro-padded"]["token_ids"]


def test_bench_var_main(bench, tmp_path, capsys):
    _, var = bench
    out = tmp_path / "var.json"
    assert var.main([*SMOKE, "--rho", "0.3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert list(rows) == ["plain", "var", "reference"]
    for name, row in rows.items():
        assert row["steps"] == TOKENS
        for key in ("per_token_s", "total_s", "x_plain_per_token", "x_reference_per_token", "x_reference_total"):
            assert _finite(row[key]), (name, key, row[key])
    assert rows["reference"]["x_reference_per_token"] == 1.0
    # smoke: 56 px / patch 14 = 16 image tokens; a sink at image tokens 0 and 8; 4 layers: VAR
    # changes layer 2 only
    for name in ("var", "reference"):
        info = rows[name]["info"]
        assert info["visual_sinks"] == 2 and info["layers"] == [2], name
        assert 0 < info["changed_rows"] <= info["eligible_rows"], name
    assert rows["var"]["info"] == rows["reference"]["info"]  # the same rows changed on both paths
    assert rows["plain"]["info"] == {}
    assert data["same_tokens_as_reference"] is True
    text = capsys.readouterr().out
    assert "<= 1.20x" in text and "vis sinks" in text


def test_7b_shape_is_llava_1_5_7b_sized(bench, tmp_path):
    """The ``--shape 7b`` model, built on the meta device (no memory): LLaVA-1.5-7B's 7.06 B
    parameters (Vicuna-7B with a 32064-token vocabulary 6.74 B, CLIP ViT-L/14-336 0.30 B, the
    two-layer projector 0.02 B), bf16, 32 decoder layers of width 4096."""
    decoding, var = bench
    mllm = decoding.make_mllm("7b", decoding.processor_dir("7b", tmp_path / "processor"), device="meta", dtype="bf16")
    params = sum(p.numel() for p in mllm.model.parameters())
    assert 7.05e9 < params < 7.08e9
    assert mllm.model.dtype == torch.bfloat16
    assert (mllm.adapter.num_layers, mllm.adapter.hidden_size) == (32, 4096)
    assert var.plant_tau(4096) == 20.0  # the paper's tau: the planted phi is sqrt(2048) = 45
