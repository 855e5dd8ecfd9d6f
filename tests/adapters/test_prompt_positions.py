"""The position facet: the positions of a prompt a method built, as ``generate`` would pass them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402

QUESTIONS = ["what is it?", "is there a dog in the picture at all?"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (80, 50, 3), dtype=np.uint8))]


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_of_the_unchanged_prompt_are_the_models_own(tiny_mllm, family):
    """Rebuilding the positions of the prompt as it is gives what the model computes itself: the
    1D cumsum of a left-padded mask, or (Qwen) the text row plus the model's M-RoPE rows."""
    mllm = tiny_mllm(family)
    batch = mllm.prepare(_images(), QUESTIONS)
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]
    counts = [[lay.num_tokens for lay in layouts] for layouts in batch.layouts]
    positions = mllm.adapter.prompt_positions(batch, ids, mask, counts)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, L], by hand
    if positions.dim() == 2:
        assert torch.equal(positions, text)
        return
    assert positions.shape == (4, *ids.shape)
    assert torch.equal(positions[0], text)
    inputs = batch.inputs
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (ids == int(mllm.adapter.image_token_id)).long()
    rope, _ = mllm.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=mask)
    assert torch.equal(positions[1:], rope)


def test_a_shortened_image_gets_a_row_grid_unless_told(tiny_mllm):
    """Qwen: an image cut to n tokens is placed on a (1, n) grid by default, on the given grid
    otherwise, and a grid that cannot hold the tokens is refused."""
    from innersight.decode.contrast import splice_images
    from innersight.errors import MethodError

    mllm = tiny_mllm("qwen2_vl")
    batch = mllm.prepare(_images()[:1], QUESTIONS[:1])
    dim = mllm.adapter.language_model.get_input_embeddings().weight.shape[1]
    row = splice_images(mllm.adapter, batch, [[torch.zeros(4, dim)]])
    square = splice_images(mllm.adapter, batch, [[torch.zeros(4, dim)]], grid_shapes=[[(2, 2)]])
    image = (row.input_ids[0] == int(mllm.adapter.image_token_id)).nonzero()[:, 0]  # [4]
    # height / width rows over the 4 image tokens: one row of 4 vs a 2x2 grid (units of merged tokens)
    assert row.position_ids[2, 0, image].tolist() == [int(row.position_ids[2, 0, image[0]])] * 4
    assert len(set(row.position_ids[3, 0, image].tolist())) == 4
    assert len(set(square.position_ids[2, 0, image].tolist())) == 2
    assert len(set(square.position_ids[3, 0, image].tolist())) == 2
    with pytest.raises(MethodError, match="cannot hold"):
        splice_images(mllm.adapter, batch, [[torch.zeros(4, dim)]], grid_shapes=[[(3, 2)]])
