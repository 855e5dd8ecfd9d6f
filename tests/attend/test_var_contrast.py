"""VAR with a contrastive negative branch (DAMRO, VCD) in one ``generate`` call.

The defined semantics: VAR acts on the main rows only, the negative rows run plain attention.
Checked on tiny LLaVA and Qwen2-VL with planted massive activations (so VAR really changes rows):
the handler-row scope of :mod:`innersight.attention` on hand-made tensors; the main logits under
``contrast + VAR`` equal VAR alone at every step and the negative logits equal an uncached plain
forward of the negative prompt; batched == serial == unbatched; the model restored after an
exception; ViCrop + VAR + DAMRO through ``mllm.answer``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from innersight.attend.var import VAR, VARConfig
from innersight.attention import (
    IMPLEMENTATION,
    handler_row_limit,
    handler_rows,
    layer_handlers,
    sdpa_forward,
    text_attention,
)
from innersight.decode.contrast import BRANCH_MODES, ContrastiveProcessor
from innersight.decode.damro import DAMRO, DAMROConfig
from innersight.decode.vcd import VCD, VCDConfig
from innersight.testing.faults import RaiseOnStep

FAMILIES = ["llava", "qwen2_vl"]
CONTRASTS = ["damro", "vcd"]
#: DAMRO outlier count per tiny family (LLaVA 16 patches, Qwen >= 2 merged tokens per test image)
K = {"llava": 3, "qwen2_vl": 2}
QUESTIONS = ["what is it?", "is there a dog in the picture?"]
STEPS = 3


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


IMAGES = [_image(90, 60, 0), _image(50, 80, 1)]


def _var_config(plant) -> VARConfig:
    return VARConfig(sink_dims=plant.dims, tau=plant.tau, rho=0.3)


def _contrast_settings(method: str, family: str, **extra) -> dict:
    return {"k": K[family], **extra} if method == "damro" else dict(extra)


def _processor(mllm, batch, method: str, family: str, **extra) -> ContrastiveProcessor:
    if method == "damro":
        impl = DAMRO(DAMROConfig(**_contrast_settings(method, family, **extra)))
    else:
        impl = VCD(VCDConfig(**extra))
    (proc,) = impl.processors(mllm, batch, {})
    return proc


class _Record(LogitsProcessor):
    """Keeps a copy of the scores it is given (the main logits, before any contrast)."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.scores.append(scores.float().clone())
        return scores


def _run(mllm, batch, *, var: VAR | None = None, proc: ContrastiveProcessor | None = None):
    """Greedy ``STEPS`` tokens with optional VAR and contrast; returns (token ids, main scores per
    step [B, V], negative (input_ids, logits) per step)."""
    record = _Record()
    negatives: list[tuple[torch.Tensor, torch.Tensor]] = []
    processors = [record]
    if proc is not None:
        original = proc.branch.step_logits

        def spy(input_ids):
            out = original(input_ids)
            negatives.append((input_ids.clone(), out.clone()))
            return out

        proc.branch.step_logits = spy
        processors.append(proc)
    with (var.activate(mllm, batch) if var is not None else contextlib.nullcontext()), \
            (proc if proc is not None else contextlib.nullcontext()):
        ids = mllm.generate(batch, max_new_tokens=STEPS, logits_processor=LogitsProcessorList(processors))
    return ids, record.scores, negatives


def _uncached_negative(mllm, proc: ContrastiveProcessor, batch, input_ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, V] of the negative prompt plus the tokens generated so far, one
    full forward with no cache and plain attention (outside any method)."""
    neg = proc.branch.inputs
    module = mllm.adapter.generation_module
    embed = mllm.adapter.language_model.get_input_embeddings()
    new = input_ids[:, batch.input_ids.shape[1]:]  # [B, t]
    t = new.shape[1]
    step = torch.arange(1, t + 1, device=neg.position_ids.device)
    ids = torch.cat([neg.input_ids, new.to(neg.input_ids.device)], 1)
    with torch.no_grad(), mllm.adapter.injecting(ids, neg.injected):  # the prompt's DeepStack rows (Qwen3-VL)
        out = module(
            inputs_embeds=torch.cat([neg.inputs_embeds, embed(new)], 1),
            attention_mask=torch.cat([neg.attention_mask, neg.attention_mask.new_ones(neg.rows, t)], 1),
            position_ids=torch.cat([neg.position_ids, neg.position_ids[..., -1:] + step], -1),
            use_cache=False,
        )
    return out.logits[:, -1].float()


# ---------------------------------------------------------------------- the handler-row scope
class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.is_causal = True


def test_handler_rows_split_bypass_nesting_and_restore():
    from innersight.attention import _HANDLER_ATTR, _dispatch

    layers = [_Layer(), _Layer()]
    attn = layers[0].self_attn
    seen: list[tuple[int, int]] = []

    def handler(module, query, key, value, attention_mask, **kwargs):
        seen.append((int(query.shape[0]), int(attention_mask.shape[0])))
        return torch.full((query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), 7.0), None

    setattr(attn, _HANDLER_ATTR, handler)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 1, 8, generator=gen) for _ in range(3))  # [B, H, 1, D] decoding step
    mask = torch.ones(4, 1, 1, 1, dtype=torch.bool)
    plain, _ = sdpa_forward(attn, q, k, v, mask)  # [B, 1, H, D]
    try:
        out, _ = _dispatch(attn, q, k, v, mask)
        assert torch.equal(out, torch.full_like(out, 7.0)) and seen == [(4, 4)]  # no scope: all rows
        with handler_rows(layers, 2):
            assert handler_row_limit(attn) == 2 and handler_row_limit(layers[1].self_attn) == 2
            out, _ = _dispatch(attn, q, k, v, mask)
            assert seen[-1] == (2, 2)  # the handler saw the first two rows (mask sliced with them)
            assert torch.equal(out[:2], torch.full_like(out[:2], 7.0))
            torch.testing.assert_close(out[2:], plain[2:], rtol=0, atol=1e-6)  # the rest: plain SDPA
            with handler_rows(layers, 0):
                out, _ = _dispatch(attn, q, k, v, mask)
                torch.testing.assert_close(out, plain, rtol=0, atol=0)  # bypassed
                assert len(seen) == 2
            assert handler_row_limit(attn) == 2  # the outer scope is back
            out, _ = _dispatch(attn, q[:2], k[:2], v[:2], mask[:2])  # a forward of the main rows only
            assert seen[-1] == (2, 2)
            # a mask broadcast over rows ([1, ...]) is passed as it is
            _dispatch(attn, q, k, v, mask[:1])
            assert seen[-1] == (2, 1)
        with pytest.raises(RuntimeError, match="inside"):
            with handler_rows(layers, 1):
                raise RuntimeError("inside")
    finally:
        delattr(attn, _HANDLER_ATTR)
    assert handler_row_limit(attn) is None
    assert not any(name.startswith("_innersight") for layer in layers for name in vars(layer.self_attn))
    with pytest.raises(ValueError):
        with handler_rows(layers, -1):
            pass


def test_sink_detection_follows_the_scope(var_mllm, plant):
    """VAR's observer records nothing in a bypassed forward and only the main rows under a scope."""
    mllm = var_mllm("llava")
    batch = mllm.prepare(IMAGES, QUESTIONS)
    layers = mllm.adapter.decoder_layers
    with plant(mllm), VAR(_var_config(plant)).activate(mllm, batch) as run:
        length = batch.input_ids.shape[1]
        hidden = torch.zeros(4, length, mllm.adapter.hidden_size)  # [2B, L0, D]
        hidden[:2, -1, plant.dims[0]] = 1000.0  # a sink at the last position of the main rows
        hidden[2:, -2, plant.dims[0]] = 1000.0  # another one in the extra rows
        hidden += 0.01
        with handler_rows(layers, 0):
            run.observe(2, hidden[:2])
        assert 2 not in run.pending
        with handler_rows(layers, 2):
            run.observe(2, hidden)
        mask = run.pending.pop(2)
        assert mask.shape == (2, length)
        assert mask[:, -1].all() and not mask[:, :-1].any()


# ---------------------------------------------------------------------- on tiny models
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CONTRASTS)
@pytest.mark.parametrize("mode", BRANCH_MODES)
def test_var_acts_on_the_main_rows_only(var_mllm, plant, family, method, mode):
    """With alpha = 0 the contrast keeps the argmax, so the combined run follows VAR alone: its
    main logits equal VAR alone's at every step (the negative rows do not disturb VAR's rows), and
    its negative logits equal a plain uncached forward of the negative prompt (VAR left them alone);
    the first negative logits are the contrast-alone ones."""
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    config = _var_config(plant)
    with plant(mllm):
        _, plain_scores, _ = _run(mllm, batch)
        var_alone = VAR(config)
        var_ids, var_scores, _ = _run(mllm, batch, var=var_alone)
        alone_proc = _processor(mllm, batch, method, family, alpha=0.0, branch=mode)
        _, _, alone_neg = _run(mllm, batch, proc=alone_proc)
        var = VAR(config)
        proc = _processor(mllm, batch, method, family, alpha=0.0, branch=mode)
        both_ids, both_scores, both_neg = _run(mllm, batch, var=var, proc=proc)
    assert proc.branch.mode == mode
    # VAR really changes the main rows here (the comparisons below are not vacuous)
    assert var.last_run.stats[2].changed_rows > 0
    assert float((var_scores[0] - plain_scores[0]).abs().max()) > 1e-3
    assert both_ids == var_ids and len(both_scores) == len(var_scores) == STEPS
    for combined, alone in zip(both_scores, var_scores):
        torch.testing.assert_close(combined, alone, rtol=0, atol=1e-4)
    # VAR's state describes the main prompt: the same sink masks as VAR alone (the negative
    # prefill, of the same length for VCD, did not replace them)
    assert torch.equal(var.last_run.sinks[2], var_alone.last_run.sinks[2])
    assert var.last_run.stats[2].changed_rows == var_alone.last_run.stats[2].changed_rows
    torch.testing.assert_close(both_neg[0][1], alone_neg[0][1], rtol=0, atol=1e-4)
    assert len(both_neg) == STEPS
    for input_ids, logits in both_neg:
        torch.testing.assert_close(logits, _uncached_negative(mllm, proc, batch, input_ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CONTRASTS)
def test_packed_negative_cache_equals_the_padded_one_under_var(var_mllm, plant, family, method):
    """VAR on the main rows, the negative rows plain: with the negative rows kept at their own
    length (packed) the tokens, the main scores and the negative logits of every step are those of
    the padded merge."""
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    runs = {}
    with plant(mllm):
        for cache in ("packed", "padded"):
            var = VAR(_var_config(plant))
            proc = _processor(mllm, batch, method, family, alpha=3.0, negative_cache=cache)
            runs[cache] = _run(mllm, batch, var=var, proc=proc)
            assert proc.branch.details()["negative_cache"] == cache
            assert var.last_run.stats[2].changed_rows > 0
    (ids, scores, negatives), (padded_ids, padded_scores, padded_negatives) = runs["packed"], runs["padded"]
    assert ids == padded_ids and len(scores) == len(padded_scores) == STEPS
    for a, b in zip(scores, padded_scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(negatives) == len(padded_negatives) == STEPS
    for (_, a), (_, b) in zip(negatives, padded_negatives):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert text_attention(mllm.model) == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CONTRASTS)
def test_first_step_under_a_real_contrast(var_mllm, plant, family, method):
    """alpha = 3: at the first step the main logits are VAR alone's, the negative logits the
    contrast alone's, and the chosen scores their contrast."""
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    with plant(mllm):
        _, var_scores, _ = _run(mllm, batch, var=VAR(_var_config(plant)))
        _, _, alone_neg = _run(mllm, batch, proc=_processor(mllm, batch, method, family, alpha=3.0))
        proc = _processor(mllm, batch, method, family, alpha=3.0)
        _, both_scores, both_neg = _run(mllm, batch, var=VAR(_var_config(plant)), proc=proc)
    torch.testing.assert_close(both_scores[0], var_scores[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(both_neg[0][1], alone_neg[0][1], rtol=0, atol=1e-4)
    # the negative branch differs from the main one (the contrast is not the identity)
    assert float((both_neg[0][1] - both_scores[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CONTRASTS)
def test_end_to_end_batched_equals_serial_and_batch_equals_unbatched(var_mllm, plant, family, method, monkeypatch):
    mllm = var_mllm(family)
    runs: list[VAR] = []
    original = VAR.activate

    def spy(self, mllm_, batch):
        runs.append(self)
        return original(self, mllm_, batch)

    monkeypatch.setattr(VAR, "activate", spy)
    var = {"sink_dims": plant.dims, "tau": plant.tau, "rho": 0.3}
    methods = [method, "var"]
    tokens = {}
    with plant(mllm):
        for mode in BRANCH_MODES:
            settings = {"var": var, method: _contrast_settings(method, family, alpha=3.0, branch=mode)}
            both = mllm.answer_batch(IMAGES, QUESTIONS, methods=methods, settings=settings, max_new_tokens=4)
            assert runs[-1].last_run.stats[2].changed_rows > 0
            alone = [mllm.answer(i, q, methods=methods, settings=settings, max_new_tokens=4)
                     for i, q in zip(IMAGES, QUESTIONS)]
            assert [a.token_ids for a in both] == [a.token_ids for a in alone]
            assert all(a.token_ids for a in both)
            assert all(a.methods == tuple(methods) for a in both)
            tokens[mode] = [a.token_ids for a in both]
    assert tokens["batched"] == tokens["serial"]
    assert text_attention(mllm.model) == "sdpa"


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _no_marks(mllm) -> bool:
    return not any(name.startswith("_innersight") for layer in mllm.adapter.decoder_layers
                   for name in vars(layer.self_attn))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", BRANCH_MODES)
def test_model_restored_after_exit_and_after_an_exception(var_mllm, plant, family, mode):
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    settings = {"var": {"sink_dims": plant.dims, "tau": plant.tau, "rho": 0.3},
                "damro": {"k": K[family], "alpha": 3.0, "branch": mode}}
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    hooks = _hooks(mllm.model)
    with plant(mllm):
        planted_hooks = _hooks(mllm.model)
        mllm.answer_batch(IMAGES, QUESTIONS, methods=["damro", "var"], settings=settings, max_new_tokens=3)
        assert _hooks(mllm.model) == planted_hooks and _no_marks(mllm)
        assert text_attention(mllm.model) == "sdpa"
        stop = RaiseOnStep(2)
        with pytest.raises(RuntimeError, match="boom"):
            mllm.answer_batch(IMAGES, QUESTIONS, methods=["damro", "var"], settings=settings, max_new_tokens=5,
                              stopping_criteria=StoppingCriteriaList([stop]))
        assert stop.calls == 2  # it failed after a decoding step of the shared (or serial) branch
        assert _hooks(mllm.model) == planted_hooks and _no_marks(mllm)
        assert text_attention(mllm.model) == "sdpa"
    assert _hooks(mllm.model) == hooks
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_scope_is_removed_when_the_branch_exits_inside_var(var_mllm, plant):
    """The batched branch's row scope lives exactly as long as its context, inside VAR's."""
    mllm = var_mllm("llava")
    batch = mllm.prepare(IMAGES, QUESTIONS)
    proc = _processor(mllm, batch, "damro", "llava", alpha=3.0)
    attn = mllm.adapter.decoder_layers[2].self_attn
    with plant(mllm), VAR(_var_config(plant)).activate(mllm, batch):
        with proc:
            mllm.generate(batch, max_new_tokens=2, logits_processor=LogitsProcessorList([proc]))
            assert proc.branch.mode == "batched" and handler_row_limit(attn) == len(batch)
        assert handler_row_limit(attn) is None
        assert text_attention(mllm.model) == IMPLEMENTATION  # VAR is still active
    assert text_attention(mllm.model) == "sdpa" and _no_marks(mllm)


def test_other_handlers_follow_the_scope_too(var_mllm, plant):
    """Any layer handler active during a contrastive generate sees the main rows only."""
    mllm = var_mllm("llava")
    batch = mllm.prepare(IMAGES, QUESTIONS)
    proc = _processor(mllm, batch, "vcd", "llava", alpha=1.0)
    shapes: list[tuple[int, int]] = []

    def handler(module, query, key, value, attention_mask, **kwargs):
        shapes.append((int(query.shape[0]), int(query.shape[2])))
        return sdpa_forward(module, query, key, value, attention_mask, **kwargs)

    with layer_handlers(mllm.model, mllm.adapter.decoder_layers, {1: handler}), proc:
        mllm.generate(batch, max_new_tokens=3, logits_processor=LogitsProcessorList([proc]))
    prompt = batch.input_ids.shape[1]
    # the main prefill and two decoding steps, two rows each; never the negative prefill or rows
    assert shapes == [(2, prompt), (2, 1), (2, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_vicrop_var_damro_in_one_call(var_mllm, plant, family):
    mllm = var_mllm(family)
    methods = ["vicrop-rel-att", "var", "damro"]
    settings = {"var": {"sink_dims": plant.dims, "tau": plant.tau, "rho": 0.3}, "damro": {"k": 2, "alpha": 3.0}}
    images = [_image(120, 80, 3), _image(70, 100, 4)]
    questions = ["what is the digit in the red circle?", "is there a star?"]
    with plant(mllm):
        both = mllm.answer_batch(images, questions, methods=methods, settings=settings, max_new_tokens=3)
        alone = [mllm.answer(i, q, methods=methods, settings=settings, max_new_tokens=3)
                 for i, q in zip(images, questions)]
    for a, b in zip(both, alone):
        assert a.methods == tuple(methods)
        assert a.box is not None and a.box == pytest.approx(b.box, abs=1e-3)
        assert a.token_ids and a.token_ids == b.token_ids
        assert set(a.details["configs"]) == set(methods)
    assert text_attention(mllm.model) == "sdpa" and _no_marks(mllm)
