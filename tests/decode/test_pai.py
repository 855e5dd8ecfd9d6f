"""PAI: the amplification and guidance closed forms, the attention handler against an eager oracle,
only the predicting row changed in the model, the steps as the closed form of both branches,
identity at zero strength, batch == unbatched == serial, the model restored, refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.decode.contrast import BRANCH_MODES
from innersight.decode.image_free import image_free_inputs
from innersight.decode.pai import (
    PAI,
    ImageAttention,
    PAIConfig,
    PAIProcessor,
    amplified_attention,
    amplify,
    guidance,
)
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.steps import (
    assert_restored_after_exit_and_exception,
    spy_steps,
    uncached_negative,
)

QUESTIONS = ["what is it?", "is there a dog in the picture?"]
ALL_LAYERS = {"start_layer": "0"}


def test_amplify_and_guidance_by_hand():
    z = torch.tensor([[2.0, -1.0, -4.0, float("-inf")]])
    image = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(amplify(z, image, 0.5), torch.tensor([[3.0, -0.5, -4.0, float("-inf")]]))
    s = torch.tensor([[1.0, 0.0, -5.0]])
    u = torch.tensor([[0.0, 1.0, 0.0]])
    ls, lu = torch.log_softmax(s, -1), torch.log_softmax(u, -1)
    out = guidance(s, u, gamma=1.5, beta=0.1)
    assert torch.isinf(out[0, 2])  # p = e^-5 / Z < 0.1 max p
    torch.testing.assert_close(out[0, :2], (1.5 * ls - 0.5 * lu)[0, :2])
    torch.testing.assert_close(guidance(s, u, gamma=1.0, beta=1e-9), ls)


def _batch(b, length, image_positions):
    layouts = [[SimpleNamespace(num_tokens=len(p), positions=torch.tensor(p))] for p in image_positions]
    return SimpleNamespace(input_ids=torch.zeros(b, length, dtype=torch.long), layouts=layouts)


def test_handler_is_the_eager_closed_form_on_the_last_row_only():
    torch.manual_seed(0)
    b, h, hkv, lq, d = 2, 4, 2, 5, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, hkv, lq, d), torch.randn(b, hkv, lq, d)
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])  # sample 0 is left-padded
    causal = torch.ones(lq, lq, dtype=torch.bool).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, Lq, Lk]
    mask[0, 0, 0, 0] = True  # the pad row attends to itself (SDPA would give NaN)
    handler = ImageAttention(_batch(b, lq, [[1, 2], [0, 1, 2]]), alpha=0.7)
    module = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=2)
    out, _ = handler(module, q, k, v, mask, scaling=0.3)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # [B, H, L, d]
    z = (q @ kk.transpose(-1, -2)) * 0.3  # [B, H, Lq, Lk]
    z = z.masked_fill(~mask, float("-inf"))
    image = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, :]
    last = z[:, :, -1:, :]
    last = torch.where(image[:, :, None, :], last + 0.7 * last.abs(), last)
    expected_last = (torch.softmax(last, -1) @ vv).transpose(1, 2)  # [B, 1, H, d]
    expected_rest = (torch.softmax(z[:, :, :-1], -1) @ vv).transpose(1, 2)  # [B, Lq-1, H, d]
    torch.testing.assert_close(out[:, -1:], expected_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :-1], expected_rest[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, 1:-1], expected_rest[0, 1:], atol=1e-5, rtol=1e-5)
    plain, _ = ImageAttention(_batch(b, lq, [[1, 2], [0, 1, 2]]), alpha=0.0)(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(plain[:, -1:], (torch.softmax(z[:, :, -1:], -1) @ vv).transpose(1, 2),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_predicting_row_changes_in_the_configured_layers(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(3), image(4, 50, 80)], QUESTIONS)
    with torch.no_grad():
        plain = mllm.model(**batch.inputs, output_hidden_states=True)
        config = PAIConfig(alpha=2.0, start_layer=1)
        with amplified_attention(mllm, batch, config) as handler:
            pai = mllm.model(**batch.inputs, output_hidden_states=True)
    assert handler.calls == mllm.adapter.num_layers - 1  # one prefill through layers 1..N-1
    hp, hq = mllm.adapter.decoder_hidden_states(plain), mllm.adapter.decoder_hidden_states(pai)
    valid = batch.inputs["attention_mask"].bool()[:, :-1]
    torch.testing.assert_close(hq[1], hp[1])  # layer 0 untouched
    torch.testing.assert_close(hq[-1][:, :-1][valid], hp[-1][:, :-1][valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hq[-1][:, -1], hp[-1][:, -1], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_are_the_closed_form_of_both_branches(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    (proc,) = PAI(PAIConfig(alpha=1.0, gamma=2.0, start_layer=0)).processors(mllm, batch, {})
    assert isinstance(proc, PAIProcessor)
    seen = spy_steps(mllm, batch, proc, keep=lambda p: p.last_negative.clone())
    assert proc.branch.mode == "batched" and seen
    neg = image_free_inputs(mllm.adapter, batch)
    prompt = batch.input_ids.shape[1]
    for input_ids, scores, negative, out in seen:  # the image-free rows run plain attention
        torch.testing.assert_close(negative, uncached_negative(mllm, neg, input_ids, prompt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, guidance(scores, negative, gamma=2.0, beta=0.1))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_is_plain_and_batch_equals_unbatched_and_serial(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    plain = [a.token_ids for a in mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)]
    for name in ("pai", "pai-attention"):
        zero = mllm.answer_batch(images, QUESTIONS, methods=[name], max_new_tokens=4,
                                 settings={"pai": {**ALL_LAYERS, "alpha": "0", "gamma": "1"}})
        assert [a.token_ids for a in zero] == plain
    runs = {}
    for mode in BRANCH_MODES:
        settings = {"pai": {**ALL_LAYERS, "alpha": "3", "gamma": "2", "branch": mode}}
        both = mllm.answer_batch(images, QUESTIONS, methods=["pai"], settings=settings, max_new_tokens=4)
        alone = [mllm.answer(i, q, methods=["pai"], settings=settings, max_new_tokens=4).token_ids
                 for i, q in zip(images, QUESTIONS)]
        assert [a.token_ids for a in both] == alone
        runs[mode] = alone
    assert runs["batched"] == runs["serial"]


def test_strong_pai_changes_the_answer_and_composes_at_the_attention_point(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(0), QUESTIONS[1], max_new_tokens=6)
    pai = mllm.answer(image(0), QUESTIONS[1], methods=["pai"], max_new_tokens=6,
                      settings={"pai": {**ALL_LAYERS, "alpha": "3", "gamma": "2"}})
    assert pai.token_ids != plain.token_ids
    attention = mllm.answer(image(0), QUESTIONS[1], methods=["pai-attention"], max_new_tokens=6,
                            settings={"pai": {**ALL_LAYERS, "alpha": "5"}})
    assert attention.token_ids != plain.token_ids
    both = mllm.answer(image(1, 50, 80), QUESTIONS[1], methods=["pai-attention", "vcd"], max_new_tokens=6,
                       settings={"pai": ALL_LAYERS})
    assert both.details["vcd"]["branch"]["mode"] == "batched"


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    assert_restored_after_exit_and_exception(mllm, image(10), ("pai", "pai-attention"), {"pai": {**ALL_LAYERS, "alpha": "2"}}, attention=True)


def test_refusals(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    for bad in ({"alpha": -1.0}, {"gamma": 0.5}, {"beta": 0.0}, {"start_layer": 3, "end_layer": 2}):
        with pytest.raises(MethodError):
            PAIConfig(**bad)
    with pytest.raises(MethodError, match="outside the model"):
        mllm.answer(image(0), "what is it?", methods=["pai"])  # layers 2..: the tiny model has 2
    deeper = tiny_mllm("llava", num_layers=4)  # VAR modifies layers 2..N-2
    with pytest.raises(MethodError, match="another attention method"):
        deeper.answer(image(0), "what is it?", methods=["pai", "var"], settings={"pai": ALL_LAYERS,
                                                                              "var": {"sink_dims": "0"}})
    assert resolve_methods(["pai-attention"], {"pai": {"alpha": "0.5"}}).objects[0].config.alpha == 0.5
    assert "2407.21771" in PAIConfig.__dataclass_fields__["alpha"].metadata["source"]
    assert math.isclose(PAIConfig().gamma, 1.1)
