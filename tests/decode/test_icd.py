"""ICD: the disturbed prompt (where the prefix goes, the main image embeddings reused), the steps
as the closed form of both branches, identity at zero strength, batch == unbatched, the batched
request falling back with its reason, the model restored."""

from __future__ import annotations

import pytest
import torch

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.decode.contrast import contrast
from innersight.decode.icd import DISTURBANCES, ICD, ICDConfig, PromptEmbeddings, disturbed_inputs
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.steps import (
    assert_restored_after_exit_and_exception,
    spy_steps,
    uncached_negative,
)

QUESTIONS = ["what is it?", "is there a dog in the picture?"]


def test_defaults_and_registry():
    c = ICDConfig()
    assert (c.alpha, c.beta, c.disturbance, c.branch) == (1.0, 0.1, DISTURBANCES[0], "batched")
    assert "2403.18715" in ICDConfig.__dataclass_fields__["disturbance"].metadata["source"]
    (method,) = resolve_methods(["icd"], {"icd": {"disturbance": "You always give wrong answers."}}).objects
    assert isinstance(method, ICD) and method.config.disturbance == DISTURBANCES[2]
    for bad in ({"alpha": -1.0}, {"beta": 0.0}, {"disturbance": "  "}, {"branch": "both"}):
        with pytest.raises(MethodError):
            ICDConfig(**bad)


def _captured(mllm, batch):
    """The main prefill's input embeddings [B, L0, D] and decoder injections (None, or Qwen3-VL's
    DeepStack rows [S, N, D])."""
    capture = PromptEmbeddings(mllm.adapter, batch.input_ids.shape[1])
    with capture, torch.no_grad():
        mllm.model(**batch.inputs)
    return capture.embeds, capture.injected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_disturbance_goes_before_the_instruction_with_the_main_image_tokens(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(4), image(5, 50, 80)], QUESTIONS)
    embeds, injected = _captured(mllm, batch)
    neg = disturbed_inputs(mllm.adapter, batch, embeds, DISTURBANCES[0], injected)
    tok = mllm.adapter.tokenizer
    extra = tok(DISTURBANCES[0], add_special_tokens=False)["input_ids"]
    assert neg.length == batch.input_ids.shape[1] + len(extra)
    image_id = mllm.adapter.image_token_id
    for b in range(2):
        row = neg.input_ids[b][neg.attention_mask[b].bool().to(neg.input_ids.device)].tolist()
        main = batch.input_ids[b][batch.inputs["attention_mask"][b].bool()].tolist()
        at = next(i for i in range(len(row)) if row[i:i + len(extra)] == extra)
        assert row[:at] + row[at + len(extra):] == main  # the main prompt with the prefix inserted
        assert image_id in row[:at] and image_id not in row[at:]  # after the image, before the instruction
        question = tok(QUESTIONS[b], add_special_tokens=False)["input_ids"]
        q = tok.decode(question).strip()
        assert q in tok.decode(row[at + len(extra):]) and q not in tok.decode(row[:at])  # the whole instruction after it
        mask_main = batch.inputs["attention_mask"][b].bool()
        valid = neg.attention_mask[b].bool()
        kept = torch.cat([neg.inputs_embeds[b][valid][:at], neg.inputs_embeds[b][valid][at + len(extra):]])
        torch.testing.assert_close(kept, embeds[b][mask_main])  # image features reused, not recomputed
    # decoder injections (Qwen3-VL's DeepStack): the main prefill's rows, one per image token, kept
    if not mllm.adapter.image_injection_layers:
        assert injected is None and neg.injected is None
    else:
        with torch.no_grad():
            rows = mllm.adapter.image_rows(batch, batch.inputs["pixel_values"])
        torch.testing.assert_close(injected, torch.cat([r.injected for r in rows], dim=1))
        assert neg.injected.shape[1] == int((neg.input_ids == image_id).sum())
        torch.testing.assert_close(neg.injected, injected)


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_are_the_closed_form_of_both_branches(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6), image(7, 50, 80)], QUESTIONS)
    for branch in ("batched", "serial"):  # the packed rows (where the family packs them) and the serial branch
        (proc,) = ICD(ICDConfig(alpha=1.5, branch=branch)).processors(mllm, batch, {})
        seen = spy_steps(mllm, batch, proc, keep=lambda p: p.last_negative.clone())
        assert seen
        if branch == "serial" or proc.branch.fallback is not None:
            assert proc.branch.mode == "serial"
        else:
            assert proc.branch.mode == "batched" and proc.branch.negative_cache == "packed"
        embeds, injected = _captured(mllm, batch)
        neg = disturbed_inputs(mllm.adapter, batch, embeds, DISTURBANCES[0], injected)
        prompt = batch.input_ids.shape[1]
        for input_ids, scores, negative, out in seen:
            torch.testing.assert_close(negative, uncached_negative(mllm, neg, input_ids, prompt), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out, contrast(scores, negative, alpha=1.5, beta=0.1))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_alpha_is_plain_and_batch_equals_unbatched(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    images = [image(8), image(9, 50, 80)]
    plain = [a.token_ids for a in mllm.answer_batch(images, QUESTIONS, max_new_tokens=4)]
    zero = mllm.answer_batch(images, QUESTIONS, methods=["icd"], settings={"icd": {"alpha": 0.0}}, max_new_tokens=4)
    assert [a.token_ids for a in zero] == plain
    settings = {"icd": {"alpha": 3.0}}
    both = mllm.answer_batch(images, QUESTIONS, methods=["icd"], settings=settings, max_new_tokens=4)
    alone = [mllm.answer(i, q, methods=["icd"], settings=settings, max_new_tokens=4).token_ids
             for i, q in zip(images, QUESTIONS)]
    assert [a.token_ids for a in both] == alone


class _Scores:
    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().clone())
        return scores


def test_batched_branch_packs_the_longer_disturbed_prompt(tiny_mllm, image, monkeypatch):
    """The disturbed prompt is longer than the main one: batched (the default) packs its rows at
    their own length, with the serial branch's tokens and scores; where packing is impossible it
    falls back to serial, with its reason."""
    from innersight.decode import contrast as branch_module

    mllm = tiny_mllm("llava")

    def run(**settings):
        scores = _Scores()
        answer = mllm.answer(image(2), QUESTIONS[0], methods=["icd"], settings={"icd": {"alpha": 3.0, **settings}},
                             max_new_tokens=4, logits_processor=[scores])
        return answer, scores

    serial, serial_scores = run(branch="serial")
    batched, batched_scores = run()
    assert batched.token_ids == serial.token_ids
    branch = batched.details["icd"]["branch"]
    assert branch["mode"] == "batched" and branch["negative_cache"] == "packed", branch
    assert len(batched_scores.steps) == len(serial_scores.steps) > 0
    for a, b in zip(batched_scores.steps, serial_scores.steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(branch_module, "_why_not_packed", lambda *args: "a reason of the test")
    fallback, _ = run()
    assert fallback.token_ids == serial.token_ids
    branch = fallback.details["icd"]["branch"]
    assert branch["mode"] == "serial"
    assert "longer than the main prompt and cannot be packed: a reason of the test" in branch["fallback"]


def test_strong_icd_changes_the_answer(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(1, 50, 80), QUESTIONS[1], max_new_tokens=6)
    icd = mllm.answer(image(1, 50, 80), QUESTIONS[1], methods=["icd"], settings={"icd": {"alpha": 5.0}},
                      max_new_tokens=6)
    assert icd.token_ids != plain.token_ids


@pytest.mark.parametrize("family", ["instructblip", "qwen2_vl"])
def test_model_restored_after_exit_and_after_exception(tiny_mllm, image, family):
    mllm = tiny_mllm(family)
    assert_restored_after_exit_and_exception(mllm, image(10), "icd", None)
