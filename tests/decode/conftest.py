"""Shared helpers of the decoding tests: images, hook counts, and a plain greedy loop that
re-runs the whole sequence each step (no cache, no hooks) so that a method's closed form can be
applied by hand to ``output_hidden_states`` and compared with the processor inside ``generate``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def image() -> Callable[..., Image.Image]:
    """``image(seed, w=90, h=60)``: a random RGB image."""
    return _image


def _hook_counts(mllm: Any) -> list[tuple[int, int]]:
    modules = [*mllm.adapter.decoder_layers, mllm.adapter.final_norm, mllm.adapter.lm_head, mllm.model]
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules]


@pytest.fixture(scope="session")
def hook_counts() -> Callable[[Any], list[tuple[int, int]]]:
    """``hook_counts(mllm)``: (forward hooks, pre-hooks) of every decoder layer, the final norm,
    the LM head and the whole model."""
    return _hook_counts


def _greedy_oracle(
    mllm: Any,
    image: Image.Image,
    question: str,
    choose: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor],
    steps: int,
) -> list[int]:
    """Greedy tokens of one sample where each step's scores are ``choose(final [V] float32,
    hidden_states)`` (hidden_states: ``num_layers + 1`` tensors [D] at the last position, the last
    already normed); full forward each step, ``output_hidden_states=True``, stops at eos/pad."""
    batch = mllm.prepare([image], [question])
    inputs = dict(batch.inputs)
    tok = mllm.adapter.tokenizer
    stop = {tok.eos_token_id, tok.pad_token_id}
    out_ids: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            out = mllm.model(**inputs, output_hidden_states=True, use_cache=False)
            hs = tuple(h[0, -1] for h in mllm.adapter.decoder_hidden_states(out))
            scores = choose(out.logits[0, -1].float(), hs)
        token = int(scores.argmax())
        if token in stop:
            break
        out_ids.append(token)
        new = torch.tensor([[token]], dtype=inputs["input_ids"].dtype)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                fill = new if key == "input_ids" else torch.full_like(new, 1 if key == "attention_mask" else 0)
                inputs[key] = torch.cat([inputs[key], fill], dim=1)
    return out_ids


@pytest.fixture(scope="session")
def greedy_oracle() -> Callable[..., list[int]]:
    """``greedy_oracle(mllm, image, question, choose, steps)``: see :func:`_greedy_oracle`."""
    return _greedy_oracle
