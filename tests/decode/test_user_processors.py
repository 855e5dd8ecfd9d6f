"""A caller's ``logits_processor`` and ``stopping_criteria`` run together with the decoding
methods' processors (methods first, then the caller's), never replaced by them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from innersight.errors import MethodError

STEPS = 4


class Force(LogitsProcessor):
    """Counts its calls, remembers whether the scores it got already held ``-inf`` (a method's
    mask), then forces ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.calls = 0
        self.saw_masked = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.calls += 1
        self.saw_masked |= bool(torch.isneginf(scores).any())
        out = torch.full_like(scores, float("-inf"))  # [B, V]
        out[:, self.token] = 0.0
        return out


class Count(StoppingCriteria):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _word_token(mllm: Any) -> int:
    tok = mllm.adapter.tokenizer
    special = set(tok.all_special_ids)
    return next(i for i in range(len(tok)) if i not in special and tok.decode([i]).strip())


# (method, settings): damro and vcd on both negative-branch modes; dola's alpha and the contrasts'
# beta raised so that their -inf mask shows on a random model's flat distribution
CASES = [
    ([], None),
    (["deco"], None),
    (["dola"], {"dola": {"alpha": "0.9"}}),
    (["damro"], {"damro": {"branch": "serial", "beta": "0.9"}}),
    (["damro"], {"damro": {"branch": "batched", "beta": "0.9"}}),
    (["vcd"], {"vcd": {"branch": "serial", "beta": "0.9"}}),
    (["vcd"], {"vcd": {"branch": "batched", "beta": "0.9"}}),
]


@pytest.mark.parametrize("methods,settings", CASES, ids=lambda x: str(x))
def test_user_processor_and_stopping_criteria_run_with_each_decoding_method(tiny_mllm, image, methods, settings):
    mllm = tiny_mllm("llava")
    token = _word_token(mllm)
    force, count = Force(token), Count()
    answer = mllm.answer(image(3), "what is it?", methods=methods, settings=settings, max_new_tokens=STEPS,
                         logits_processor=LogitsProcessorList([force]),
                         stopping_criteria=StoppingCriteriaList([count]))
    assert force.calls == STEPS  # one call per generated token: the processor was kept
    assert count.calls == STEPS
    assert answer.token_ids == [token] * STEPS  # and its choice is the last word
    # the methods' processors ran before it: it received their masked scores (the model's raw
    # logits never hold -inf), and without a method it gets the raw logits
    assert force.saw_masked == bool(methods)


def test_a_single_user_processor_is_accepted_and_batches_stay_equal(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    token = _word_token(mllm)
    answers = mllm.answer_batch([image(1), image(2)], ["what is it?", "is there a star?"], methods=["deco"],
                                max_new_tokens=2, logits_processor=Force(token))
    assert [a.token_ids for a in answers] == [[token, token], [token, token]]


def test_merge_order_is_methods_then_user():
    from innersight.methods import merge_processors

    a, b, c = Force(1), Force(2), Force(3)
    assert list(merge_processors([a], LogitsProcessorList([b, c]))) == [a, b, c]
    assert list(merge_processors([a], b)) == [a, b]
    assert list(merge_processors([a], None)) == [a]
    with pytest.raises(MethodError, match="logits_processor"):
        merge_processors([a], 3)
