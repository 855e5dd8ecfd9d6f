"""DeCo / DoLa read their early-exit rows from the model's own lm_head call (one call per step):
same logits and answers as the separate call, the model's logits untouched."""

from __future__ import annotations

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.decode.early_exit import EarlyExit


def _count_head_calls(mllm):
    calls = []
    handle = mllm.adapter.lm_head.register_forward_hook(lambda m, a, out: calls.append(tuple(out.shape)))
    return calls, handle


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("norm", [True, False])
def test_fused_rows_equal_separate_call(tiny_mllm, family, norm, image):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    batch = mllm.prepare([image(0), image(1, 50, 80)], ["what is it?", "is there a dog in the picture?"])
    layers = tuple(range(adapter.num_layers + 1))
    with torch.no_grad():
        plain = mllm.model(**batch.inputs).logits
        with EarlyExit(adapter, layers) as separate:
            mllm.model(**batch.inputs)
            expected = separate.logits(norm=norm)  # [B, n, V]
        with EarlyExit(adapter, layers, fuse_norm=norm) as fused:
            out = mllm.model(**batch.inputs).logits
            assert fused._fused_count == 1
            got = fused.logits(norm=norm)
            other = fused.logits(norm=not norm)  # the other norm: a separate call, still right
    torch.testing.assert_close(out, plain)  # the model's own logits keep their shape and values
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, len(layers), plain.shape[-1])
    assert other.shape == got.shape and not torch.equal(other, got)


@pytest.mark.parametrize("method", ["deco", "dola"])
def test_one_head_call_per_step_same_answer(tiny_mllm, image, monkeypatch, method):
    mllm = tiny_mllm("llava")
    settings = {"deco": {"alpha": 40.0, "layers": (1, 2)}} if method == "deco" else None
    calls, handle = _count_head_calls(mllm)
    try:
        fused = mllm.answer(image(3), "what is it?", methods=[method], settings=settings,
                            max_new_tokens=5, min_new_tokens=5)
        fused_calls = list(calls)
        calls.clear()
        monkeypatch.setattr(EarlyExit, "__init__", _unfused_init(EarlyExit.__init__))
        separate = mllm.answer(image(3), "what is it?", methods=[method], settings=settings,
                               max_new_tokens=5, min_new_tokens=5)
    finally:
        handle.remove()
    assert fused.token_ids == separate.token_ids
    assert len(fused_calls) == 5  # one lm_head call per generated token
    assert len(calls) == 10  # the separate path: the model's call and the early-exit call


def _unfused_init(original):
    def init(self, adapter, layers, fuse_norm=None):
        original(self, adapter, layers, fuse_norm=None)

    return init
