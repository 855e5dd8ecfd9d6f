"""Test helpers for decoding methods (M3ID, ICD, PAI, VISTA, ONLY): spy on a processor's steps,
recompute a negative branch's logits without a cache, compare hook counts and model outputs."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessorList


def spy_steps(mllm: Any, batch: Any, proc: Any, *, max_new_tokens: int = 4, keep: Any = None) -> list[tuple]:
    """Run ``generate`` with ``proc`` (entered as a context when it is one) and record each step's
    ``(input_ids, scores, keep(proc), output)``."""
    seen: list[tuple] = []
    call = type(proc).__call__

    def spy(input_ids, scores):
        out = call(proc, input_ids, scores)
        seen.append((input_ids.clone(), scores.clone(), keep(proc) if keep else None, out.clone()))
        return out

    if hasattr(proc, "__enter__"):
        with proc:
            mllm.generate(batch, max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([spy]))
    else:
        mllm.generate(batch, max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([spy]))
    return seen


def uncached_negative(mllm: Any, neg: Any, input_ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Last-position logits [B, V] of the negative prompt ``neg`` followed by the tokens generated
    so far (``input_ids[:, prompt:]``), one forward with no cache (carrying the prompt's decoder
    injections where the family has them: Qwen3-VL's DeepStack)."""
    module = mllm.adapter.generation_module
    embed = mllm.adapter.language_model.get_input_embeddings()
    new = input_ids[:, prompt:]
    step = torch.arange(1, new.shape[1] + 1, device=neg.position_ids.device)
    ids = torch.cat([neg.input_ids, new.to(neg.input_ids.device)], 1)  # [B, Ln + t]
    mask = torch.cat([neg.attention_mask, neg.attention_mask.new_ones(new.shape)], 1)  # [B, Ln + t]
    with torch.no_grad(), mllm.adapter.injecting(ids, neg.injected):
        return module(inputs_embeds=torch.cat([neg.inputs_embeds, embed(new)], 1), attention_mask=mask,
                      position_ids=torch.cat([neg.position_ids, neg.position_ids[..., -1:] + step], -1),
                      use_cache=False, **neg.extra_inputs(mllm.adapter, ids, mask)).logits[:, -1].float()


def hooks(mllm: Any) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in mllm.model.named_modules()}


def attention_state(mllm: Any) -> tuple[str, list[tuple[str, ...]]]:
    """The text attention implementation and our attributes left on the attention modules."""
    from innersight.attention import text_attention

    attrs = [tuple(a for a in vars(layer.self_attn) if a.startswith("_innersight")) for layer in mllm.adapter.decoder_layers]
    return text_attention(mllm.model), attrs


def assert_restored_after_exit_and_exception(mllm: Any, image: Any, names: Any, settings: Any = None,
                                             *, attention: bool = False) -> None:
    """Run each method of ``names`` once to the end and once into an exception raised mid-generation
    (:class:`~innersight.testing.faults.RaiseOnStep`); afterwards the hooks (and, with
    ``attention``, the attention implementation and our attributes on its modules) are as before
    each run, and the model's logits equal the untouched model's exactly."""
    import pytest
    from transformers import StoppingCriteriaList

    from .faults import RaiseOnStep

    batch = mllm.prepare([image], ["what is it?"])
    with torch.no_grad():
        before = mllm.model(**batch.inputs).logits
    counts = hooks(mllm)
    state = attention_state(mllm) if attention else None
    for name in [names] if isinstance(names, str) else names:
        mllm.answer(image, "what is it?", methods=[name], settings=settings, max_new_tokens=3)
        with pytest.raises(RuntimeError, match="boom"):
            mllm.answer(image, "what is it?", methods=[name], settings=settings, max_new_tokens=5,
                        stopping_criteria=StoppingCriteriaList([RaiseOnStep(2)]))
        assert hooks(mllm) == counts
        if attention:
            assert attention_state(mllm) == state
    with torch.no_grad():
        torch.testing.assert_close(mllm.model(**batch.inputs).logits, before, rtol=0, atol=0)
