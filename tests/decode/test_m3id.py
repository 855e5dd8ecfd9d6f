"""M3ID: the closed form on synthetic tensors, the image-free branch reproduced without a cache,
identity at zero strength, batch == unbatched == serial, the model restored, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.adapters.base import Batch
from innersight.decode.contrast import BRANCH_MODES
from innersight.decode.image_free import image_free_inputs
from innersight.decode.m3id import M3ID, M3IDConfig, m3id_scores, m3id_weight
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.steps import (
    assert_restored_after_exit_and_exception,
    spy_steps,
    uncached_negative,
)

QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def test_closed_form_by_hand():
    lc = torch.tensor([[2.0, 1.0, -3.0, 0.5]])
    lu = torch.tensor([[1.0, 2.0, 0.0, 0.5]])
    # t = 10, lambda = 0.1: gamma = e^-1, weight (1 - gamma) / gamma = e - 1
    w = math.e - 1
    assert m3id_weight(10, 0.1) == pytest.approx(w)
    out = m3id_scores(lc, lu, step=10, lam=0.1, beta=0.1)
    # cutoff 2 + log 0.1 = -0.303: token 2 (-3) is dropped, token 3 (0.5) kept
    expected = torch.tensor([[2 + w * 1.0, 1 + w * -1.0, float("-inf"), 0.5]])
    torch.testing.assert_close(out, expected)
    assert m3id_weight(0, 0.02) == 0.0  # the first token is the conditioned model's
    torch.testing.assert_close(m3id_scores(lc, lu, step=0, lam=0.02, beta=1e-9), lc)


@pytest.mark.parametrize("kwargs", [{"lam": -0.1}, {"lam": float("nan")}, {"beta": 0.0}, {"branch": "x"}])
def test_invalid_settings_refused(kwargs):
    with pytest.raises(MethodError):
        M3IDConfig(**kwargs)


def test_defaults_and_registry():
    c = M3IDConfig()
    assert (c.lam, c.beta, c.branch) == (0.02, 0.1, "batched")
    assert "2403.14003" in M3IDConfig.__dataclass_fields__["lam"].metadata["source"]
    (method,) = resolve_methods(["m3id"], {"m3id": {"lam": "0.5"}}).objects
    assert isinstance(method, M3ID) and method.config.lam == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_are_the_closed_form_of_the_image_free_branch(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    (proc,) = M3ID(M3IDConfig(lam=0.5)).processors(mllm, batch, {})
    seen = spy_steps(mllm, batch, proc, keep=lambda p: p.last_negative.clone())
    assert proc.branch.mode == "batched" and len(seen) >= 2
    neg = image_free_inputs(mllm.adapter, batch)
    assert neg.length < batch.input_ids.shape[1]
    prompt = batch.input_ids.shape[1]
    for t, (input_ids, scores, negative, out) in enumerate(seen):
        torch.testing.assert_close(negative, uncached_negative(mllm, neg, input_ids, prompt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, m3id_scores(scores, negative, step=t, lam=0.5, beta=0.1))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_rate_is_plain_and_batch_equals_unbatched_and_serial(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    plain = [a.token_ids for a in mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)]
    zero = mllm.answer_batch(images, QUESTIONS, methods=["m3id"], settings={"m3id": {"lam": "0"}}, max_new_tokens=4)
    assert [a.token_ids for a in zero] == plain
    runs = {}
    for mode in BRANCH_MODES:
        settings = {"m3id": {"lam": 2.0, "branch": mode}}
        both = mllm.answer_batch(images, QUESTIONS, methods=["m3id"], settings=settings, max_new_tokens=4)
        alone = [mllm.answer(i, q, methods=["m3id"], settings=settings, max_new_tokens=4).token_ids
                 for i, q in zip(images, QUESTIONS)]
        assert [a.token_ids for a in both] == alone
        runs[mode] = alone
        assert both[0].details["m3id"]["branch"]["mode"] == mode
    assert runs["batched"] == runs["serial"]


def test_strong_m3id_changes_the_answer(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(1, 50, 80), QUESTIONS[1], max_new_tokens=6)
    m3id = mllm.answer(image(1, 50, 80), QUESTIONS[1], methods=["m3id"], settings={"m3id": {"lam": 3.0}},
                       max_new_tokens=6)
    assert m3id.token_ids != plain.token_ids


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    assert_restored_after_exit_and_exception(mllm, image(10), "m3id", None)


def test_refusals(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    with pytest.raises(MethodError, match="beam search"):
        mllm.answer(image(0), "what is it?", methods=["m3id"], num_beams=2)
    batch = mllm.prepare([image(0)], ["what is it?"])
    no_images = Batch(inputs={k: v for k, v in batch.inputs.items() if k != "pixel_values"}, prompts=batch.prompts,
                      image_sizes=[[]], layouts=[[]])
    with pytest.raises(MethodError, match="needs images"):
        M3ID().processors(mllm, no_images, {})
    with pytest.raises(MethodError, match="decoding point"):
        resolve_methods(["m3id", "vcd"])
