"""DoLa baseline: the closed form on synthetic logits, layer buckets, and the method on every family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import StoppingCriteriaList

from innersight.decode.dola import DoLa, DoLaConfig, DoLaProcessor, bucket_layers, dola_contrast, lm_head_tied
from innersight.errors import MethodError
from innersight.methods import resolve_methods
from innersight.testing.faults import RaiseOnStep

NEG = float("-inf")
from innersight.adapters import FAMILIES  # noqa: E402

#: on random tiny models the un-normed embeddings give a near-uniform early exit, which makes DoLa
#: equal to greedy; with the final norm applied the contrast is strong enough to change answers
STRONG = {"final_norm": True, "layers": (0, 1)}


class Fixed:
    """A layer-logits source with fixed early-exit logits [B, N, V]; records the norm flag."""

    def __init__(self, logits: torch.Tensor) -> None:
        self._logits = logits
        self.norms: list[bool] = []

    def logits(self, norm: bool = True) -> torch.Tensor:
        self.norms.append(norm)
        return self._logits


def logs(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def jsd(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence by hand (natural log)."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log(a / c) for a, c in zip(x, m) if a > 0)  # noqa: E731
    return 0.5 * (kl(p) + kl(q))


# ---------------------------------------------------------------------- closed form, synthetic
def test_closed_form_one_row_hand_computed():
    p = [0.5, 0.3, 0.16, 0.04]
    q_a = [0.25, 0.25, 0.25, 0.25]
    q_b = [0.4, 0.35, 0.2, 0.05]
    out, premature, divergences = dola_contrast(torch.tensor([logs(*p)]), torch.tensor([[logs(*q_a), logs(*q_b)]]),
                                                alpha=0.1)
    torch.testing.assert_close(divergences, torch.tensor([[jsd(p, q_a), jsd(p, q_b)]]))
    assert jsd(p, q_a) > jsd(p, q_b)
    assert premature.tolist() == [0]
    # head: p >= 0.1 * 0.5 = 0.05 -> tokens 0, 1, 2 ; contrast log p - log q_a
    expected = [math.log(0.5 / 0.25), math.log(0.3 / 0.25), math.log(0.16 / 0.25), NEG]
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_rows_choose_their_own_premature_layer():
    p0, p1 = [0.5, 0.3, 0.16, 0.04], [0.1, 0.2, 0.3, 0.4]
    uniform = [0.25, 0.25, 0.25, 0.25]
    scores = torch.tensor([logs(*p0), logs(*p1)])
    early = torch.tensor([[logs(*uniform), logs(*p0)],  # row 0: layer 1 equals the final (JSD 0)
                          [logs(*p1), logs(0.7, 0.1, 0.1, 0.1)]])  # row 1: layer 0 equals the final
    both, premature, divergences = dola_contrast(scores, early, alpha=0.1)
    assert premature.tolist() == [0, 1]
    assert divergences[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert divergences[1, 0].item() == pytest.approx(0.0, abs=1e-7)
    expected_1 = [math.log(0.1 / 0.7), math.log(0.2 / 0.1), math.log(0.3 / 0.1), math.log(0.4 / 0.1)]
    torch.testing.assert_close(both[1], torch.tensor(expected_1))
    for row in range(2):
        alone, prem, _ = dola_contrast(scores[row:row + 1], early[row:row + 1], alpha=0.1)
        torch.testing.assert_close(alone, both[row:row + 1])
        assert prem.tolist() == [premature[row].item()]


def test_plausibility_constraint():
    scores = torch.tensor([logs(0.45, 0.3, 0.2, 0.05)])
    early = torch.tensor([[logs(0.1, 0.1, 0.1, 0.7)]])
    out, _, _ = dola_contrast(scores, early, alpha=0.5)  # head: p >= 0.225 -> tokens 0, 1
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()
    out, _, _ = dola_contrast(scores, early, alpha=1.0)  # only the top token
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out, _, _ = dola_contrast(scores, early, alpha=0.1)  # p >= 0.045: all four tokens
    expected = [math.log(4.5), math.log(3.0), math.log(2.0), math.log(0.05 / 0.7)]
    torch.testing.assert_close(out, torch.tensor([expected]))
    assert int(out.argmax()) == 0


def test_log_prob_inputs_give_normalised_log_probs():
    scores = torch.tensor([logs(0.5, 0.3, 0.16, 0.04), logs(0.1, 0.2, 0.3, 0.4)])
    early = torch.tensor([[logs(0.25, 0.25, 0.25, 0.25)], [logs(0.7, 0.1, 0.1, 0.1)]])
    raw, _, _ = dola_contrast(scores, early, alpha=0.1)
    logp, _, _ = dola_contrast(torch.log_softmax(scores + 3.0, -1), early, alpha=0.1, log_probs=True)
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(2))
    torch.testing.assert_close(logp, torch.log_softmax(raw, -1))


def test_processor_is_pure_reads_the_norm_flag_and_names_layers():
    scores = torch.tensor([logs(0.5, 0.3, 0.16, 0.04)])
    before = scores.clone()
    source = Fixed(torch.tensor([[logs(0.25, 0.25, 0.25, 0.25), logs(0.5, 0.3, 0.16, 0.04)]]))
    proc = DoLaProcessor(source, layers=(0, 2))
    out = proc(torch.zeros(1, 2, dtype=torch.long), scores)
    torch.testing.assert_close(scores, before)
    assert source.norms == [False] and proc.last_premature.tolist() == [0]
    DoLaProcessor(source, final_norm=True)(torch.zeros(1, 2, dtype=torch.long), scores)
    assert source.norms == [False, True]
    assert out[0, 0].item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.5}, {"bucket": "middle"}, {"layers": ()}])
def test_invalid_settings_refused(kwargs):
    with pytest.raises(MethodError):
        DoLaConfig(**kwargs)


# ---------------------------------------------------------------------- layers
def test_buckets_follow_the_reference():
    assert bucket_layers(32, "low") == (0, 2, 4, 6, 8, 10, 12, 14)
    assert bucket_layers(32, "high") == (16, 18, 20, 22, 24, 26, 28, 30)
    assert bucket_layers(32, "low", skip_embeddings=True) == (2, 4, 6, 8, 10, 12, 14)
    assert bucket_layers(40, "high") == (20, 22, 24, 26, 28, 30, 32, 34, 36, 38)
    assert bucket_layers(80, "low") == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18)
    assert bucket_layers(80, "high") == (60, 62, 64, 66, 68, 70, 72, 74, 76, 78)
    assert bucket_layers(2, "low") == (0,) and bucket_layers(2, "high") == (1,)


def test_resolve_layers_and_tied_heads():
    embed = torch.nn.Embedding(10, 4)
    untied = SimpleNamespace(num_layers=2, lm_head=torch.nn.Linear(4, 10, bias=False),
                             language_model=SimpleNamespace(get_input_embeddings=lambda: embed))
    tied_head = torch.nn.Linear(4, 10, bias=False)
    tied_head.weight = embed.weight
    tied = SimpleNamespace(num_layers=2, lm_head=tied_head,
                           language_model=SimpleNamespace(get_input_embeddings=lambda: embed))
    assert not lm_head_tied(untied) and lm_head_tied(tied)
    assert DoLaConfig().resolve_layers(untied) == (0,)
    with pytest.raises(MethodError, match="empty"):
        DoLaConfig().resolve_layers(tied)  # layer 0 skipped, nothing left below the half
    assert DoLaConfig(bucket="high").resolve_layers(tied) == (1,)
    assert DoLaConfig(layers=(0, 1)).resolve_layers(untied) == (0, 1)
    with pytest.raises(MethodError, match="mature"):
        DoLaConfig(layers=(2,)).resolve_layers(untied)


def test_registry_and_overrides():
    plan = resolve_methods(["dola"], {"dola": {"layers": "0,1", "final_norm": "true", "bucket": "high"}})
    (method,) = plan.objects
    assert isinstance(method, DoLa)
    assert method.config == DoLaConfig(layers=(0, 1), final_norm=True, bucket="high")
    assert method.config.alpha == 0.1
    assert "2309.03883" in DoLaConfig.__dataclass_fields__["alpha"].metadata["source"]


# ---------------------------------------------------------------------- on the models
class _Spy:
    """Wraps DoLaProcessor.__call__ to record (input scores, output)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = DoLaProcessor.__call__
        spy = self

        def call(proc, input_ids, scores):
            out = original(proc, input_ids, scores)
            spy.calls.append((scores.clone(), out.clone()))
            return out

        monkeypatch.setattr(DoLaProcessor, "__call__", call)


@pytest.mark.parametrize("family", FAMILIES)
def test_dola_generate_equals_hand_oracle(tiny_mllm, family, image, greedy_oracle):
    mllm = tiny_mllm(family)
    adapter = mllm.adapter

    def choose(final, hs):
        logq_n = torch.log_softmax(final.double(), -1)
        q_n = logq_n.exp()
        best, base = -1.0, None
        for i in STRONG["layers"]:
            logq = torch.log_softmax(adapter.lm_head(adapter.final_norm(hs[i])).double(), -1)
            q = logq.exp()
            m = (q_n + q) / 2
            div = 0.5 * float((q_n * (logq_n - m.log())).sum() + (q * (logq - m.log())).sum())
            if div > best:
                best, base = div, logq
        head = q_n >= 0.1 * q_n.max()
        return torch.where(head, logq_n - base, torch.full_like(logq_n, NEG))

    plain_tokens, dola_tokens = [], []
    for seed, question in ((0, "what is it?"), (1, "is there a dog?")):
        expected = greedy_oracle(mllm, image(seed), question, choose, steps=4)
        got = mllm.answer(image(seed), question, methods=["dola"], settings={"dola": STRONG}, max_new_tokens=4)
        assert got.token_ids == expected
        dola_tokens.append(got.token_ids)
        plain_tokens.append(mllm.answer(image(seed), question, max_new_tokens=4).token_ids)
    assert dola_tokens != plain_tokens  # the contrast does change these answers


@pytest.mark.parametrize("family", FAMILIES)
def test_top_token_only_is_plain_greedy_and_batch_equals_alone(tiny_mllm, family, image):
    mllm = tiny_mllm(family)
    images, questions = [image(2), image(3, 50, 80)], ["what is it?", "is there a dog in the picture?"]
    plain = mllm.answer_batch(images, questions, max_new_tokens=4)
    only_top = mllm.answer_batch(images, questions, methods=["dola"], settings={"dola": {**STRONG, "alpha": 1.0}},
                                 max_new_tokens=4)
    assert [a.token_ids for a in only_top] == [a.token_ids for a in plain]
    both = mllm.answer_batch(images, questions, methods=["dola"], settings={"dola": STRONG}, max_new_tokens=4)
    alone = [mllm.answer(i, q, methods=["dola"], settings={"dola": STRONG}, max_new_tokens=4)
             for i, q in zip(images, questions)]
    assert [a.token_ids for a in both] == [a.token_ids for a in alone]


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_returns_log_probs(tiny_mllm, family, image, monkeypatch):
    mllm = tiny_mllm(family)
    spy = _Spy(monkeypatch)
    answers = mllm.answer_batch([image(4), image(5)], ["what is it?", "is there a dog?"], methods=["dola"],
                                settings={"dola": STRONG}, num_beams=2, max_new_tokens=3)
    assert len(answers) == 2 and spy.calls
    for scores, out in spy.calls:
        torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_restored_after_exit_and_after_exception(tiny_mllm, family, image, hook_counts):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([image(6)], ["what is it?"])
    before_hooks = hook_counts(mllm)
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    mllm.answer(image(6), "what is it?", methods=["dola"], max_new_tokens=3)
    assert hook_counts(mllm) == before_hooks
    with pytest.raises(RuntimeError, match="boom"):
        mllm.answer(image(6), "what is it?", methods=["dola"], settings={"dola": STRONG}, max_new_tokens=5,
                    stopping_criteria=StoppingCriteriaList([RaiseOnStep(2)]))
    assert hook_counts(mllm) == before_hooks
    with torch.no_grad():
        after = mllm.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
