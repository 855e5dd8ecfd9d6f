"""DeCo: the closed form on synthetic logits, early-exit capture, and the method on every family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from innersight.decode.deco import DeCo, DeCoConfig, DeCoProcessor, candidates, deco_correct
from innersight.decode.early_exit import EarlyExit
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.faults import RaiseOnStep

NEG = float("-inf")
from innersight.adapters import FAMILIES  # noqa: E402


class Fixed:
    """A layer-logits source with fixed early-exit logits [B, N, V]."""

    def __init__(self, logits: torch.Tensor, layers: tuple[int, ...] | None = None) -> None:
        self._logits = logits
        if layers is not None:
            self.layers = layers

    def logits(self, norm: bool = True) -> torch.Tensor:
        return self._logits


def logs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


# ---------------------------------------------------------------------- closed form, synthetic
def test_closed_form_one_row_hand_computed():
    final = torch.tensor([logs(0.5, 0.3, 0.15, 0.05)])  # softmax = these probabilities
    layer_a = logs(0.1, 0.6, 0.2, 0.1)  # best candidate prob 0.6
    layer_b = logs(0.7, 0.1, 0.1, 0.1)  # best candidate prob 0.7 -> anchor
    early = torch.tensor([[layer_a, layer_b]])  # [1, 2, 4]
    out, anchor, max_prob = deco_correct(final, early, alpha=0.6, top_k=3, top_p=0.9)
    # candidates: top-3 = tokens 0, 1, 2 (mass before each 0, 0.5, 0.8 < 0.9); token 3 excluded
    c = 0.6 * 0.7
    expected = [math.log(0.5) + c * math.log(0.7), math.log(0.3) + c * math.log(0.1),
                math.log(0.15) + c * math.log(0.1), NEG]
    torch.testing.assert_close(out, torch.tensor([expected]))
    assert anchor.tolist() == [1]
    assert max_prob.item() == pytest.approx(0.7)


def test_candidates_keep_the_crossing_token_and_respect_top_k():
    probs = torch.tensor([[0.04, 0.6, 0.01, 0.35], [0.25, 0.25, 0.25, 0.25]])
    ids, keep = candidates(probs, top_k=3, top_p=0.9)
    # row 0: 0.6 (before 0), 0.35 (before 0.6 -> kept, crosses 0.9), 0.04 (before 0.95 -> cut)
    assert ids[0].tolist() == [1, 3, 0] and keep[0].tolist() == [True, True, False]
    # row 1: before 0, 0.25, 0.5 -> all three kept (top_k cap)
    assert keep[1].tolist() == [True, True, True]
    _, keep1 = candidates(probs, top_k=1, top_p=0.9)
    assert keep1.tolist() == [[True], [True]]


def test_anchor_is_the_single_largest_candidate_probability_not_a_non_candidate():
    final = torch.tensor([logs(0.6, 0.35, 0.04, 0.01)])  # candidates {0, 1}
    layer_a = logs(0.05, 0.05, 0.85, 0.05)  # huge mass on a non-candidate: must not count
    layer_b = logs(0.2, 0.5, 0.2, 0.1)  # best candidate prob 0.5 -> anchor
    out, anchor, max_prob = deco_correct(final, torch.tensor([[layer_a, layer_b]]), alpha=2.0, top_k=20, top_p=0.9)
    assert anchor.tolist() == [1] and max_prob.item() == pytest.approx(0.5)
    expected = [math.log(0.6) + 1.0 * math.log(0.2), math.log(0.35) + 1.0 * math.log(0.5), NEG, NEG]
    torch.testing.assert_close(out, torch.tensor([expected]))
    assert int(out.argmax()) == 1  # the correction flipped the greedy choice (0 -> 1)


def test_confident_top_token_cannot_change():
    final = torch.tensor([logs(0.92, 0.05, 0.02, 0.01)])
    early = torch.tensor([[logs(0.01, 0.97, 0.01, 0.01)]])
    out, _, max_prob = deco_correct(final, early, alpha=100.0, top_k=20, top_p=0.9)
    assert int(out.argmax()) == 0
    assert torch.isinf(out[0, 1:]).all() and out[0, 0].item() == pytest.approx(math.log(0.92) + 100 * 0.01 * math.log(0.01))
    assert max_prob.item() == pytest.approx(0.01)


def test_alpha_zero_keeps_candidates_only():
    final = torch.tensor([[2.0, 1.0, 0.5, -3.0, -4.0]])
    early = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(0))
    out, _, _ = deco_correct(final, early, alpha=0.0, top_k=20, top_p=0.9)
    probs = torch.softmax(final, -1)[0]
    # probs ~ [0.61, 0.23, 0.14, 0.003, 0.001]: before = 0, 0.61, 0.84, 0.977 -> candidates 0, 1, 2
    assert probs[:3].sum() > 0.9 > probs[:2].sum()
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0, 0.5, NEG, NEG]]))


def test_rows_have_their_own_candidates_and_anchor():
    final = torch.tensor([logs(0.5, 0.3, 0.15, 0.05), logs(0.05, 0.1, 0.25, 0.6)])
    early = torch.tensor([
        [logs(0.7, 0.1, 0.1, 0.1), logs(0.1, 0.6, 0.2, 0.1)],  # row 0: layer 0 holds 0.7 -> anchor 0
        [logs(0.1, 0.1, 0.3, 0.5), logs(0.05, 0.05, 0.8, 0.1)],  # row 1: layer 1 holds 0.8 -> anchor 1
    ])
    both, anchors, probs = deco_correct(final, early, alpha=0.6, top_k=20, top_p=0.9)
    assert anchors.tolist() == [0, 1]
    torch.testing.assert_close(probs, torch.tensor([0.7, 0.8]))
    # row 1 candidates: token 3 (0.6), token 2 (before 0.6), token 1 (before 0.85 < 0.9, kept, crosses);
    # token 0 cut (before 0.95)
    c = 0.6 * 0.8
    expected_1 = [NEG, math.log(0.1) + c * math.log(0.05), math.log(0.25) + c * math.log(0.8),
                  math.log(0.6) + c * math.log(0.1)]
    torch.testing.assert_close(both[1], torch.tensor(expected_1))
    for row in range(2):
        alone, anchor, _ = deco_correct(final[row:row + 1], early[row:row + 1], alpha=0.6, top_k=20, top_p=0.9)
        torch.testing.assert_close(alone, both[row:row + 1])
        assert anchor.tolist() == [anchors[row].item()]


def test_log_prob_inputs_give_normalised_log_probs():
    final = torch.tensor([logs(0.5, 0.3, 0.15, 0.05), logs(0.25, 0.25, 0.4, 0.1)])
    early = torch.tensor([[logs(0.7, 0.1, 0.1, 0.1)], [logs(0.1, 0.2, 0.3, 0.4)]])
    raw, _, _ = deco_correct(final, early, alpha=0.6, top_k=20, top_p=0.9)
    logp, _, _ = deco_correct(torch.log_softmax(final, -1), early, alpha=0.6, top_k=20, top_p=0.9, log_probs=True)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2))
    torch.testing.assert_close(logp, torch.log_softmax(raw, -1))
    # hand check row 0: candidates 0, 1, 2 with corrected scores s_i; log-prob = s_i - logsumexp(s)
    c = 0.6 * 0.7
    s = torch.tensor([math.log(0.5) + c * math.log(0.7), math.log(0.3) + c * math.log(0.1),
                      math.log(0.15) + c * math.log(0.1)])
    torch.testing.assert_close(logp[0, :3], s - s.logsumexp(0))


def test_processor_is_pure_and_names_anchor_layers():
    final = torch.tensor([logs(0.5, 0.3, 0.15, 0.05)])
    before = final.clone()
    early = torch.tensor([[logs(0.1, 0.6, 0.2, 0.1), logs(0.7, 0.1, 0.1, 0.1)]])
    proc = DeCoProcessor(Fixed(early), alpha=0.6, top_k=3, top_p=0.9, layers=(20, 21))
    out = proc(torch.zeros(1, 3, dtype=torch.long), final)
    torch.testing.assert_close(final, before)
    assert proc.last_anchor.tolist() == [21]
    assert out[0, 0].item() == pytest.approx(math.log(0.5) + 0.42 * math.log(0.7))


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"alpha": float("nan")}])
def test_invalid_settings_refused(kwargs):
    with pytest.raises(MethodError):
        DeCoConfig(**kwargs)
    with pytest.raises(MethodError):
        DeCoProcessor(Fixed(torch.zeros(1, 1, 4)), **kwargs)


def test_mismatched_layer_logits_refused():
    with pytest.raises(MethodError, match="do not match"):
        deco_correct(torch.zeros(2, 4), torch.zeros(1, 3, 4), alpha=0.6, top_k=20, top_p=0.9)


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(("family", "depth", "first", "last"), [
    ("llava", 32, 20, 28),  # the paper's range
    ("instructblip", 32, 15, 24),  # the authors' hint
    ("qwen2_vl", 28, 17, 24),  # no published range: LLaVA's fraction of depth
    ("qwen2_5_vl", 36, 22, 31),
    ("qwen3_vl", 36, 22, 31),  # Qwen3-VL-8B: no published range, LLaVA's fraction of depth
    ("gemma3", 34, 21, 29),  # gemma-3-4b: LLaVA's fraction of depth
    ("gemma3", 6, 3, 5),  # the tiny model
    ("llava", 40, 25, 35),  # 13B: scaled
    ("llava_next", 32, 20, 28),
    ("llava_onevision", 28, 17, 24),  # Qwen2-7B decoder, no published range: LLaVA's fraction of depth
    ("internvl", 24, 15, 21),  # InternVL3-1B (Qwen2.5-0.5B, 24 layers): LLaVA's fraction
    ("smolvlm", 24, 15, 21),  # SmolVLM2-2.2B (24 layers), no published range: floor(24*20/32), floor(24*28/32)
    ("smolvlm", 2, 1, 1),  # tiny
    ("llava", 2, 1, 1),  # tiny: the one preceding layer
    ("qwen2_vl", 1, 1, 1),
])
def test_default_layer_ranges(family, depth, first, last):
    adapter = SimpleNamespace(family=family, num_layers=depth)
    assert DeCoConfig().resolve_layers(adapter) == tuple(range(first, last + 1))


def test_explicit_layers_and_their_checks():
    adapter = SimpleNamespace(family="llava", num_layers=4)
    assert DeCoConfig(layers=(2, 4)).resolve_layers(adapter) == (2, 3, 4)
    with pytest.raises(MethodError, match="outside"):
        DeCoConfig(layers=(3, 5)).resolve_layers(adapter)
    with pytest.raises(MethodError, match="first"):
        DeCoConfig(layers=(0, 2))
    with pytest.raises(MethodError, match="first"):
        DeCoConfig(layers=(3, 2))


def test_registry_and_overrides():
    plan = resolve_methods(["deco"], {"deco": {"alpha": "0.3", "layers": "20,28", "top_k": "10"}})
    (method,) = plan.objects
    assert isinstance(method, DeCo)
    assert method.config == DeCoConfig(alpha=0.3, top_k=10, layers=(20, 28))
    assert plan.at("decoding") == [method]
    fields = {f: DeCoConfig.__dataclass_fields__[f].metadata.get("source", "") for f in ("alpha", "top_k", "top_p")}
    assert all("2410.11779" in s for s in fields.values())


def test_processors_are_fresh_and_know_beam_search():
    mllm = SimpleNamespace(model=SimpleNamespace(generation_config=SimpleNamespace(num_beams=None)),
                           adapter=SimpleNamespace(family="llava", num_layers=2))
    method = DeCo()
    (greedy,) = method.processors(mllm, None, {})
    (sampling,) = method.processors(mllm, None, {"do_sample": True, "top_p": 0.8})
    (beam,) = method.processors(mllm, None, {"num_beams": 2})
    assert isinstance(greedy, DeCoProcessor) and greedy is not sampling
    assert greedy.source is not sampling.source and greedy.source.layers == (1,)
    assert (greedy.log_probs, sampling.log_probs, beam.log_probs) == (False, False, True)
    mllm.model.generation_config.num_beams = 3  # the model's own default counts too
    assert method.processors(mllm, None, {})[0].log_probs is True


# ---------------------------------------------------------------------- early exit on the models
@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_equals_hidden_states_projection(tiny_mllm, family, image, hook_counts):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    depth = adapter.num_layers
    batch = mllm.prepare([image(0), image(1, 50, 80)], ["what is it?", "is there a dog in the picture?"])
    exit_ = EarlyExit(adapter, range(depth + 1))
    with torch.no_grad():
        plain = mllm.model(**batch.inputs, output_hidden_states=True)
        # counted after that forward: transformers 5 installs its own output-capturing hooks lazily,
        # on the first forward that asks for hidden states, and keeps them
        before = hook_counts(mllm)
        with exit_:
            assert hook_counts(mllm) != before
            mllm.model(**batch.inputs)
            normed = exit_.logits()  # [B, depth + 1, V]
            raw = exit_.logits(norm=False)
        hs = adapter.decoder_hidden_states(plain)
        for i in range(depth):
            torch.testing.assert_close(normed[:, i], adapter.lm_head(adapter.final_norm(hs[i][:, -1])).float())
            torch.testing.assert_close(raw[:, i], adapter.lm_head(hs[i][:, -1]).float())
    # the last layer: the model's own logits (hidden_states[-1] is already normed: normed once)
    torch.testing.assert_close(normed[:, depth], plain.logits[:, -1].float())
    assert normed.dtype == torch.float32 and normed.shape[:2] == (2, depth + 1)
    assert hook_counts(mllm) == before
    with pytest.raises(MethodError, match="not active"):
        exit_.logits()


class _Spy:
    """Wraps DeCoProcessor.__call__ to record (input scores, early-exit logits, output)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = DeCoProcessor.__call__
        spy = self

        def call(proc, input_ids, scores):
            out = original(proc, input_ids, scores)
            spy.calls.append((scores.clone(), proc.source.logits().clone(), out.clone(), proc.last_anchor.clone()))
            return out

        monkeypatch.setattr(DeCoProcessor, "__call__", call)


@pytest.mark.parametrize("family", FAMILIES)
def test_deco_generate_equals_hand_oracle(tiny_mllm, family, image, greedy_oracle, monkeypatch):
    """generate + DeCo (cached decode steps, hooks) == a full-forward greedy loop applying the closed
    form by hand to output_hidden_states; every layer (1..depth: 1..2 of the 2-layer tiny models)
    with a strong alpha."""
    mllm = tiny_mllm(family)
    adapter = mllm.adapter
    alpha, layers = 40.0, (1, adapter.num_layers)
    every = range(layers[0], layers[1] + 1)  # DeCo's (first, last) is an inclusive range of layers

    def choose(final, hs):
        early = []
        for i in every:
            h = hs[i] if i == adapter.num_layers else adapter.final_norm(hs[i])  # hs[-1] already normed
            early.append(adapter.lm_head(h).float())
        p = torch.softmax(final.double(), -1)
        order = sorted(range(p.numel()), key=lambda t: -p[t].item())[:20]
        cand, mass = [], 0.0
        for t in order:
            cand.append(t)
            mass += p[t].item()
            if mass >= 0.9:
                break
        best, anchor = -1.0, 0
        for n, e in enumerate(early):
            q = torch.softmax(e.double(), -1)
            for t in cand:
                if q[t].item() > best:
                    best, anchor = q[t].item(), n
        out = torch.full_like(final, NEG)
        for t in cand:
            out[t] = final[t] + alpha * best * early[anchor][t]
        return out

    spy = _Spy(monkeypatch)
    for seed, question in ((0, "what is it?"), (1, "is there a dog?")):
        expected = greedy_oracle(mllm, image(seed), question, choose, steps=4)
        got = mllm.answer(image(seed), question, methods=["deco"], settings={"deco": {"alpha": alpha, "layers": layers}},
                          max_new_tokens=4)
        assert got.token_ids == expected
    # at every step (prefill and cached decode) the captured last layer equals the scores generate passed
    assert spy.calls
    for scores, early, _, _ in spy.calls:
        torch.testing.assert_close(early[:, -1], scores)


def test_deco_changes_the_answer_when_strong(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    plain = mllm.answer(image(0), "what is it?", max_new_tokens=5)
    deco = mllm.answer(image(0), "what is it?", methods=["deco"], settings={"deco": {"alpha": 50.0, "layers": (1, 2)}},
                       max_new_tokens=5)
    assert deco.token_ids != plain.token_ids
    assert deco.details["configs"]["deco"]["alpha"] == 50.0


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_is_plain_greedy(tiny_mllm, family, image):
    mllm = tiny_mllm(family)
    images, questions = [image(0), image(1, 50, 80)], ["what is it?", "is there a dog?"]
    plain = mllm.answer_batch(images, questions, max_new_tokens=4)
    deco = mllm.answer_batch(images, questions, methods=["deco"], settings={"deco": {"alpha": 0.0}}, max_new_tokens=4)
    assert [a.token_ids for a in deco] == [a.token_ids for a in plain]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_equals_each_alone(tiny_mllm, family, image, monkeypatch):
    mllm = tiny_mllm(family)
    settings = {"deco": {"alpha": 40.0, "layers": (1, 2)}}
    images, questions = [image(2), image(3, 50, 80)], ["what is it?", "is there a dog in the picture?"]
    spy = _Spy(monkeypatch)
    both = mllm.answer_batch(images, questions, methods=["deco"], settings=settings, max_new_tokens=4)
    batched_prefill = spy.calls[0]
    alone = [mllm.answer(i, q, methods=["deco"], settings=settings, max_new_tokens=4) for i, q in zip(images, questions)]
    assert [a.token_ids for a in both] == [a.token_ids for a in alone]
    assert all(a.token_ids for a in both)
    assert batched_prefill[1].shape[0] == 2 and batched_prefill[3].shape == (2,)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_gets_and_returns_log_probs(tiny_mllm, family, image, monkeypatch):
    mllm = tiny_mllm(family)
    spy = _Spy(monkeypatch)
    answers = mllm.answer_batch([image(4), image(5)], ["what is it?", "is there a dog?"], methods=["deco"],
                                num_beams=2, max_new_tokens=3)
    assert len(answers) == 2
    assert spy.calls
    for scores, _, out, _ in spy.calls:
        assert scores.shape[0] == 4  # 2 samples x 2 beams
        # transformers hands beam search processors log-probabilities ...
        torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
        # ... and DeCo returns normalised log-probabilities
        torch.testing.assert_close(out.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)


def test_sampling_sees_raw_logits_before_warpers(tiny_mllm, image, monkeypatch):
    """With do_sample the DeCo processor receives the model's raw logits (not temperature-scaled,
    not top-k filtered): transformers 5 appends the sampling warpers after user processors."""
    mllm = tiny_mllm("llava")
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    answer = mllm.answer(image(0), "what is it?", methods=["deco"], settings={"deco": {"layers": (1, 2)}},
                         do_sample=True, temperature=0.5, top_k=5, max_new_tokens=3)
    assert answer.token_ids
    for scores, early, _, _ in spy.calls:
        assert torch.isfinite(scores).all()  # no top-k -inf yet
        torch.testing.assert_close(early[:, -1], scores)  # not divided by the temperature


@pytest.mark.parametrize("family", FAMILIES)
def test_model_restored_after_exit_and_after_exception(tiny_mllm, family, image, hook_counts):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6)], ["what is it?"])
    before_hooks = hook_counts(mllm)
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    mllm.answer(image(6), "what is it?", methods=["deco"], max_new_tokens=3)
    assert hook_counts(mllm) == before_hooks
    with pytest.raises(RuntimeError, match="boom"):
        mllm.answer(image(6), "what is it?", methods=["deco"], max_new_tokens=5,
                    stopping_criteria=StoppingCriteriaList([RaiseOnStep(2)]))
    assert hook_counts(mllm) == before_hooks
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_processor_context_activates_hooks_once(tiny_mllm, image, hook_counts):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(7)], ["what is it?"])
    (proc,) = DeCo().processors(mllm, batch, {})
    before = hook_counts(mllm)
    with proc:
        ids = mllm.generate(batch, max_new_tokens=2, logits_processor=LogitsProcessorList([proc]))
        with pytest.raises(RuntimeError, match="already active"):
            proc.__enter__()
    assert hook_counts(mllm) == before
    assert proc.last_anchor.tolist() == [1] and len(ids) == 1
