"""LLaVA-1.5 adapter contract on a tiny random model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def mllm(tiny_mllm):
    return tiny_mllm("llava")


def _img(w, h, color="red"):
    return Image.new("RGB", (w, h), color)


def test_modules_and_sizes(mllm):
    a = mllm.adapter
    assert a.family == "llava"
    assert a.num_layers == len(a.decoder_layers) == 2
    assert (a.num_heads, a.num_kv_heads, a.hidden_size, a.head_dim) == (4, 4, 64, 16)
    assert a.vision_feature_layer == -2
    assert a.lm_head is mllm.model.lm_head


def test_image_tokens_match_vision_features(mllm):
    batch = mllm.prepare([_img(80, 50)], ["what is the color?"])
    (layout,) = batch.layouts[0]
    n_tokens = int((batch.input_ids[0] == mllm.adapter.image_token_id).sum())
    with torch.no_grad():
        feats = mllm.model.get_image_features(pixel_values=batch.inputs["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_feats = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    assert layout.num_tokens == n_tokens == n_feats == 16  # (56 / 14) ** 2
    assert torch.all(batch.input_ids[0, layout.positions] == mllm.adapter.image_token_id)


def test_geometry_on_wide_image_is_the_centre_crop(mllm):
    # tiny llava: shortest edge -> 56, centre crop 56. 112x56 -> 112x56, left = 28 processed px = 28 px
    (layout,) = mllm.prepare([_img(112, 56)], ["what?"]).layouts[0]
    view = layout.views[0]
    assert (view.rows, view.cols) == (4, 4)
    assert view.region == pytest.approx((28.0, 0.0, 84.0, 56.0))
    assert view.cell_box(0, 0) == pytest.approx((28.0, 0.0, 42.0, 14.0))


def test_two_images_in_one_prompt_and_left_padding(mllm):
    batch = mllm.prepare([[_img(60, 60), _img(30, 90)], _img(40, 40)], ["compare them", "what is the color of the cat?"])
    two, one = batch.layouts
    assert [lay.num_tokens for lay in two] == [16, 16]
    assert two[0].positions.max() < two[1].positions.min()
    assert len(one) == 1
    # the shorter prompt is left-padded: its image tokens start later than the raw prompt's
    assert batch.inputs["attention_mask"][1, 0] == 0 or batch.inputs["attention_mask"][0, 0] == 0
    for row, layouts in enumerate(batch.layouts):
        for lay in layouts:
            assert torch.all(batch.input_ids[row, lay.positions] == mllm.adapter.image_token_id)
            assert torch.all(batch.inputs["attention_mask"][row, lay.positions] == 1)


def test_batch_equals_unbatched(mllm):
    images = [_img(80, 50, "red"), _img(40, 70, "blue"), [_img(50, 50, "green"), _img(30, 30, "white")]]
    questions = ["what is the color?", "is there a cat in the image? please answer", "which one is larger?"]
    batched = mllm.answer_batch(images, questions, max_new_tokens=4)
    single = [mllm.answer(i, q, max_new_tokens=4) for i, q in zip(images, questions)]
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert all(len(a.token_ids) > 0 for a in batched)


def test_reference_template(mllm):
    """ViCrop's reference prompt (issue 14: images first, USER:, ASSISTANT: on a new line)."""
    assert mllm.adapter.format_prompt("why?", 2, "reference") == "<image><image>\nUSER: why?\nASSISTANT:"
    prompt = mllm.adapter.format_prompt("why?", 2, "reference")
    batch = mllm.adapter.prepare([[_img(80, 50, "red"), _img(40, 70, "blue")]], [prompt])
    rows, cols = mllm.adapter.patch_grid
    assert [lay.num_tokens for lay in batch.layouts[0]] == [rows * cols, rows * cols]  # both images expanded
