"""VISTA: steering and SLA closed forms by hand, the steering vectors against two separate uncached
forwards, the steering hook on the model, SLA steps, identity at zero strength, batch ==
unbatched, the model restored."""

from __future__ import annotations

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.decode.early_exit import EarlyExit
from innersight.decode.image_free import image_free_inputs
from innersight.decode.vista import VISTA, VISTAConfig, VISTAProcessor, augment, steer, steering_vectors
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.steps import assert_restored_after_exit_and_exception, spy_steps

QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def test_steer_and_augment_by_hand():
    h = torch.tensor([[[3.0, 0.0], [0.0, -2.0]]])  # [1, 2, 2]
    v = torch.tensor([[0.0, 5.0]])  # u = (0, 1)
    out = steer(h, v, lam=0.5)
    # row 0: unit (1, 0), cos(h, -u) = 0 -> s = 1: (1, 0.5) normalised, times |h| = 3
    torch.testing.assert_close(out[0, 0], 3 * torch.tensor([1.0, 0.5]) / (1.25 ** 0.5))
    # row 1: unit (0, -1), cos(h, -u) = 1 -> s = 2: (0, -1 + 1) = 0 vector stays 0 after normalise
    torch.testing.assert_close(out[0, 1], torch.zeros(2))
    torch.testing.assert_close(steer(h, v, lam=0.0), h)
    logits = torch.tensor([[1.0, 2.0]])
    early = torch.tensor([[[3.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(augment(logits, early, 0.25), torch.tensor([[0.75 + 0.5, 1.5]]))


def test_window_scales_with_depth_and_defaults():
    c = VISTAConfig()
    assert (c.lam, c.alpha, c.sla_start, c.sla_end) == (0.17, 0.3, 25, 30)
    assert c.window(32) == (25, 26, 27, 28, 29)
    assert c.window(40) == tuple(range(31, 37))
    assert c.window(2) == (1,)
    assert "2502.03628" in VISTAConfig.__dataclass_fields__["lam"].metadata["source"]
    for bad in ({"lam": -0.1}, {"alpha": 1.5}, {"sla_start": 30, "sla_end": 25}):
        with pytest.raises(MethodError):
            VISTAConfig(**bad)
    assert resolve_methods(["vista"], {"vista": {"lam": "0.5"}}).objects[0].config.lam == 0.5


def _last_states(mllm, **inputs):
    capture = EarlyExit(mllm.adapter, range(1, mllm.adapter.num_layers + 1))
    with capture, torch.no_grad():
        mllm.adapter.generation_module(**inputs, use_cache=False)
        return capture.hidden().float()  # [B, N, D]


@pytest.mark.parametrize("family", FAMILIES)
def test_vectors_are_the_difference_of_two_separate_forwards(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(3), image(4, 50, 80)], QUESTIONS)
    vectors = steering_vectors(mllm, batch)
    assert vectors.shape == (2, mllm.adapter.num_layers, mllm.adapter.hidden_size)
    neg = image_free_inputs(mllm.adapter, batch)
    for b in range(2):  # one sample at a time, each prompt alone: no padding shared with the other
        alone = mllm.prepare([[image(3)], [image(4, 50, 80)]][b], [QUESTIONS[b]])
        positive = steering_vectors(mllm, alone)  # batch of one: positive and negative unpadded
        torch.testing.assert_close(vectors[b], positive[0], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        negative = _last_states(mllm, inputs_embeds=neg.inputs_embeds, attention_mask=neg.attention_mask,
                                position_ids=neg.position_ids)
    capture = EarlyExit(mllm.adapter, range(1, mllm.adapter.num_layers + 1))
    with capture, torch.no_grad():  # the full model's own prefill (vision tower included) is the positive
        mllm.model(**batch.inputs)
        positive = capture.hidden().float()
    torch.testing.assert_close(vectors, positive - negative, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_steer_every_block_and_mix_the_window(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    config = VISTAConfig(lam=0.8, alpha=0.4)
    (proc,) = VISTA(config).processors(mllm, batch, {})
    assert isinstance(proc, VISTAProcessor)
    seen = spy_steps(mllm, batch, proc, keep=lambda p: p.source.logits().clone())
    assert seen
    for _, scores, early, out in seen:
        torch.testing.assert_close(out, augment(scores, early, 0.4))
    # block 1's steered output (= block 2's input) is steer(its plain output): its input is not steered.
    # A family that adds rows after block 1 (Qwen3-VL's DeepStack at the image positions) has the
    # stream steered after that addition, so block 2's input is still steer(its plain input) there.
    kept = {}

    def block_two_input(module, args, kwargs):
        kept["h"] = args[0] if args else kwargs["hidden_states"]  # [B, L, D], the latest forward's

    handle = mllm.adapter.decoder_layers[1].register_forward_pre_hook(block_two_input, with_kwargs=True)
    try:
        with proc, torch.no_grad():
            mllm.model(**batch.inputs)
        steered = kept.pop("h")
        with torch.no_grad():
            mllm.model(**batch.inputs)
        plain = kept.pop("h")
    finally:
        handle.remove()
    torch.testing.assert_close(steered, steer(plain, proc.steering.vectors[:, 0], 0.8), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_is_plain_and_batch_equals_unbatched(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    plain = [a.token_ids for a in mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)]
    zero = mllm.answer_batch(images, QUESTIONS, methods=["vista"], settings={"vista": {"lam": "0", "alpha": "0"}},
                             max_new_tokens=4)
    assert [a.token_ids for a in zero] == plain
    settings = {"vista": {"lam": "1.0", "alpha": "0.5"}}
    both = mllm.answer_batch(images, QUESTIONS, methods=["vista"], settings=settings, max_new_tokens=4)
    alone = [mllm.answer(i, q, methods=["vista"], settings=settings, max_new_tokens=4).token_ids
             for i, q in zip(images, QUESTIONS)]
    assert [a.token_ids for a in both] == alone


def test_strong_vista_changes_the_answer(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(0), QUESTIONS[1], max_new_tokens=6)
    for settings in ({"lam": "2", "alpha": "0"}, {"lam": "0", "alpha": "0.9"}):
        vista = mllm.answer(image(0), QUESTIONS[1], methods=["vista"], settings={"vista": settings}, max_new_tokens=6)
        assert vista.token_ids != plain.token_ids, settings


@pytest.mark.parametrize("family", ["llava", "instructblip"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    assert_restored_after_exit_and_exception(mllm, image(10), "vista", None)
    with pytest.raises(MethodError, match="beam search"):
        mllm.answer(image(0), "what is it?", methods=["vista"], num_beams=2)


def test_composes_with_an_attention_method(tiny_mllm, image):
    mllm = tiny_mllm("llava", num_layers=4)  # VAR modifies layers 2..N-2
    settings = {"var": {"sink_dims": "0", "tau": "0.5"}, "vista": {"lam": "1.0"}}
    both = mllm.answer_batch([image(0), image(1, 50, 80)], QUESTIONS, methods=["var", "vista"], settings=settings,
                             max_new_tokens=4)
    alone = [mllm.answer(i, q, methods=["var", "vista"], settings=settings, max_new_tokens=4).token_ids
             for i, q in zip([image(0), image(1, 50, 80)], QUESTIONS)]
    assert [a.token_ids for a in both] == alone
