"""Every family through the user path: innersight.load(saved dir) -> answer / answer_batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_answer_and_batch_equals_unbatched(tiny_mllm, family):
    mllm = tiny_mllm(family)
    assert mllm.adapter.family == family
    assert type(mllm.model).__name__ in mllm.adapter.architectures
    images = [_image(90, 60, 0), _image(50, 80, 1)]
    questions = ["what is the color of the circle?", "is there a dog?"]
    batched = mllm.answer_batch(images, questions, max_new_tokens=3)
    single = [mllm.answer(i, q, max_new_tokens=3) for i, q in zip(images, questions)]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert all(a.token_ids for a in batched)


@pytest.mark.parametrize("family", FAMILIES)
def test_layouts_point_at_image_tokens(tiny_mllm, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([[_image(90, 60, 2), _image(40, 40, 3)], _image(70, 70, 4)],
                         ["compare the two images", "what is it?"])
    assert [len(x) for x in batch.layouts] == [2, 1]
    for row, layouts in enumerate(batch.layouts):
        seen = torch.cat([lay.positions for lay in layouts])
        assert len(set(seen.tolist())) == seen.numel()  # no position claimed twice
        assert torch.all(batch.input_ids[row, seen] == mllm.adapter.image_token_id)
        assert int((batch.input_ids[row] == mllm.adapter.image_token_id).sum()) == seen.numel()
        for lay in layouts:
            assert lay.views and all(v.rows > 0 and v.cols > 0 for v in lay.views)


@pytest.mark.parametrize("family", FAMILIES)
def test_early_exit_modules_reproduce_logits(tiny_mllm, family):
    """lm_head(hidden_states[-1]) == logits: the adapter's lm_head / norm are the model's own."""
    mllm = tiny_mllm(family)
    batch = mllm.prepare([_image(64, 64, 5)], ["what is it?"])
    with torch.no_grad():
        out = mllm.model(**batch.inputs, output_hidden_states=True)
        hs = mllm.adapter.decoder_hidden_states(out)
        assert len(hs) == mllm.adapter.num_layers + 1
        logits = mllm.adapter.lm_head(hs[-1][:, -1])
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_module_runs_every_decoding_step(tiny_mllm, family):
    """Hooks on ``adapter.generation_module`` see the prefill and each decoding step."""
    mllm = tiny_mllm(family)
    calls = []
    handle = mllm.adapter.generation_module.register_forward_hook(lambda *a: calls.append(1))
    try:
        mllm.answer(_image(64, 64, 6), "what is it?", max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    assert len(calls) == 3  # prefill (-> token 1) + 2 cached steps
