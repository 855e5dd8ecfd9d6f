"""Gemma 3 adapter contract on a tiny random Gemma3ForConditionalGeneration.

Tiny model (``innersight.testing.tiny.gemma3``): the processor stretches every image to 64x64 px;
SigLIP cuts 8 px patches (an 8x8 grid, no CLS); ``mm_tokens_per_image = 16``, so the projector
average-pools 2x2 patch blocks into a 4x4 token grid. A prompt holds one ``<start_of_image>`` per
image; the processor replaces it with ``<start_of_image>`` + 16 ``<image_soft_token>`` +
``<end_of_image>`` (the ``\\n\\n`` around them vanish in the whitespace-splitting test tokenizer).
Decoder: 6 layers (5 with a sliding window of 20 tokens, then a global one), hidden 64, 4 heads, 2 KV heads.
Expected numbers are worked out by hand from the processor's and the model's arithmetic.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import innersight
from innersight.adapters import adapter_class
from innersight.adapters.gemma3 import Gemma3Adapter, pan_and_scan_boxes

BOI, SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
CHAT = "<bos><start_of_turn>user\n{images}{question}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def mllm(tiny_mllm):
    return tiny_mllm("gemma3")


@pytest.fixture(scope="module")
def pas(tiny_mllm):
    """The tiny model with pan-and-scan on (min crop 32 px, at most 4 crops, from ratio 1.2)."""
    return tiny_mllm("gemma3", do_pan_and_scan=True)


def _id(mllm, token: str) -> int:
    return int(mllm.adapter.tokenizer.convert_tokens_to_ids(token))


def _halves(width: int, height: int, split: int) -> Image.Image:
    """Red left of x = ``split``, blue from there on."""
    im = Image.new("RGB", (width, height), "blue")
    im.paste(Image.new("RGB", (split, height), "red"), (0, 0))
    return im


# ---------------------------------------------------------------------------------------- modules
def test_registry_modules_and_sizes(mllm):
    a = mllm.adapter
    assert adapter_class("gemma3") is Gemma3Adapter and isinstance(a, Gemma3Adapter)
    assert type(mllm.model).__name__ == "Gemma3ForConditionalGeneration" and a.config.model_type == "gemma3"
    assert a.language_model is mllm.model.model.language_model
    assert a.vision_tower is mllm.model.model.vision_tower
    assert a.projector is mllm.model.model.multi_modal_projector
    assert a.final_norm is a.language_model.norm and a.lm_head is mllm.model.lm_head
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.hidden_size, a.head_dim) == (6, 4, 2, 64, 16)
    assert list(a.text_config.layer_types) == ["sliding_attention"] * 5 + ["full_attention"]
    assert a.text_config.sliding_window == 20  # shorter than a 28-token prompt with one image
    assert len(a.vision_layers) == 2 and a.vision_feature_layer == -1 and a.projector_vision_layers == (1,)
    assert a.vision_post_layernorm is a.vision_tower.post_layernorm
    assert (a.patches_per_side, a.tokens_per_side, a.pool_kernel, a.tokens_per_view) == (8, 4, 2, 16)
    # the model's image token is the soft token; the processor's "image token" is the boi placeholder
    assert a.image_token_id == _id(mllm, SOFT) and str(mllm.processor.image_token) == BOI
    assert a.crop_base_size == 64
    assert a.lm_head.weight.data_ptr() == a.language_model.embed_tokens.weight.data_ptr()  # tied
    assert a.describe()["pool_kernel"] == 2


def test_no_final_logit_softcap_on_the_multimodal_head(mllm):
    """Early-exit logits are ``lm_head(norm(h))``: the model's own logits are exactly that."""
    a = mllm.adapter
    batch = mllm.prepare([Image.new("RGB", (40, 30), "green")], ["what is it?"])
    with torch.no_grad():
        out = mllm.model(**batch.inputs, output_hidden_states=True)
    last = a.decoder_hidden_states(out)[-1]  # [1, L, D], already normed
    torch.testing.assert_close(a.lm_head(last), out.logits)


# ---------------------------------------------------------------------------------------- prompts
def test_chat_and_reference_prompts(mllm):
    a = mllm.adapter
    one = CHAT.format(images=BOI, question="what is it?")
    assert a.format_prompt("what is it?", 1, "chat") == one
    assert a.format_prompt("what is it?", 1, "reference") == one
    assert a.format_prompt("  what is it?\n", 2, "chat") == CHAT.format(images=BOI * 2, question="what is it?")
    assert a.format_prompt("what is it?", 2, "reference") == CHAT.format(images=BOI * 2, question="what is it?")


def test_ids_of_a_prompt_have_one_bos_and_the_full_image_sequence(mllm):
    a = mllm.adapter
    batch = mllm.prepare([Image.new("RGB", (90, 40), "red")], ["what is it?"])
    tok = a.tokenizer
    expected = (["<bos>", "<start_of_turn>", "user", BOI] + [SOFT] * 16
                + [EOI, "what", "is", "it", "?", "<end_of_turn>", "<start_of_turn>", "model"])
    assert tok.convert_ids_to_tokens(batch.input_ids[0].tolist()) == expected
    (layout,) = batch.layouts[0]
    assert layout.positions.tolist() == list(range(4, 20)) and layout.size == (90, 40)
    assert batch.inputs["token_type_ids"][0].tolist() == [0] * 4 + [1] * 16 + [0] * 8
    torch.testing.assert_close(a.token_type_ids(batch.input_ids), batch.inputs["token_type_ids"])


@pytest.mark.parametrize("template", ["chat", "reference"])
def test_control_strings_in_the_question_stay_text(mllm, template):
    a = mllm.adapter
    question = f"describe {BOI} and {SOFT} or {EOI} <bos> <start_of_turn> model"
    prompt = a.format_prompt(question, 1, template)
    batch = a.prepare([[Image.new("RGB", (30, 30), "red")]], [prompt])
    ids = batch.input_ids[0].tolist()
    for token, count in [(SOFT, 16), (BOI, 1), (EOI, 1), ("<bos>", 1), ("<start_of_turn>", 2), ("<end_of_turn>", 1)]:
        assert ids.count(_id(mllm, token)) == count, token
    assert batch.layouts[0][0].num_tokens == 16


# ---------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("size", [(64, 64), (90, 40), (40, 90), (17, 130)])
def test_every_image_is_sixteen_tokens_between_boi_and_eoi(mllm, size):
    a = mllm.adapter
    batch = mllm.prepare([Image.new("RGB", size, "white")], ["what is it?"])
    (layout,) = batch.layouts[0]
    ids = batch.input_ids[0]
    assert layout.num_tokens == int((ids == a.image_token_id).sum()) == 16
    first, last = int(layout.positions[0]), int(layout.positions[-1])
    assert (int(ids[first - 1]), int(ids[last + 1])) == (_id(mllm, BOI), _id(mllm, EOI))
    with torch.no_grad():
        feats = mllm.model.get_image_features(batch.inputs["pixel_values"]).pooler_output  # [1, 16, D]
    assert tuple(feats.shape) == (1, 16, 64)
    (view,) = layout.views
    assert (view.name, view.rows, view.cols) == ("base", 4, 4)
    assert view.region == (0.0, 0.0, float(size[0]), float(size[1]))


def test_cell_boxes_by_hand(mllm):
    # 90x40 stretched to 64x64: token (r, c) pools patches 2r..2r+1 x 2c..2c+1 = processed pixels
    # [16c, 16c+16) x [16r, 16r+16) = original x [22.5c, 22.5c+22.5), y [10r, 10r+10)
    (view,) = mllm.adapter.views(None, 0, (90, 40))
    assert view.cell_box(1, 2) == (45.0, 10.0, 67.5, 20.0)
    assert view.cell_box(3, 3) == (67.5, 30.0, 90.0, 40.0)
    assert view.token_index[1][2] == 6 and view.token_index[3][3] == 15


def test_vision_patch_token_index_by_hand(mllm):
    index = mllm.adapter.vision_patch_token_index().tolist()  # 8x8 patches -> 4x4 tokens
    assert len(index) == 64
    # patch p = row * 8 + col -> token (row // 2) * 4 + col // 2
    assert [index[p] for p in (0, 1, 2, 7, 8, 9, 16, 27, 56, 63)] == [0, 0, 1, 3, 0, 0, 4, 5, 12, 15]


def test_tokens_are_the_pooled_patches_the_index_names(mllm):
    a = mllm.adapter
    batch = mllm.prepare([_halves(90, 40, 45)], ["what is it?"])
    pixels = batch.inputs["pixel_values"]  # [1, 3, 64, 64]
    index = a.vision_patch_token_index()  # [64]
    with torch.no_grad():
        feats = mllm.model.get_image_features(pixels).pooler_output[0]  # [16, D]
        patches = a.vision_tower(pixel_values=pixels).last_hidden_state[0]  # [64, Dv]
        pooled = torch.stack([patches[index == j].mean(0) for j in range(16)])  # [16, Dv]
        proj = a.projector
        expected = proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight  # [16, D]
    torch.testing.assert_close(feats, expected)


def test_pixel_view_is_the_stretched_image(mllm):
    """Red left half of a 90x40 image (x < 45): processed columns < 32 red, >= 32 blue, so the
    tokens of grid columns 0-1 (cells x < 45) see red and columns 2-3 blue."""
    a = mllm.adapter
    images = [[Image.new("RGB", (20, 20), "green"), Image.new("RGB", (30, 20), "green")], [_halves(90, 40, 45)]]
    batch = a.prepare(images, [CHAT.format(images=BOI * 2, question="what?"), CHAT.format(images=BOI, question="what?")])
    pixels, view = a.pixel_view(batch, batch.inputs["pixel_values"], 1)  # flat row 2
    assert tuple(pixels.shape) == (3, 64, 64) and view is batch.layouts[1][0].views[0]
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # (255, 0, 0) normalised by mean = std = 0.5
    blue = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    torch.testing.assert_close(pixels[:, :, :31], red.expand(3, 64, 31))
    torch.testing.assert_close(pixels[:, :, 33:], blue.expand(3, 64, 31))
    assert view.cell_box(0, 1)[2] == 45.0


def test_two_images_in_one_prompt_and_left_padded_batch(mllm):
    a = mllm.adapter
    prompts = [CHAT.format(images=f"{BOI}left {BOI}", question="what?"),
               CHAT.format(images=BOI, question="is there a dog in the picture?")]
    images = [[Image.new("RGB", (30, 60), "red"), Image.new("RGB", (60, 30), "blue")], [_halves(90, 40, 45)]]
    batch = a.prepare(images, prompts)
    # sample 0: bos sot user [boi 16 eoi] left [boi 16 eoi] what ? eot sot model = 3 + 18 + 1 + 18 + 5 = 45
    # sample 1: bos sot user [boi 16 eoi] is there a dog in the picture ? eot sot model = 3 + 18 + 11 = 32
    mask = batch.inputs["attention_mask"]
    assert tuple(batch.input_ids.shape) == (2, 45)
    assert mask[1].tolist() == [0] * 13 + [1] * 32 and int(batch.input_ids[1, 0]) == a.tokenizer.pad_token_id
    assert batch.inputs["token_type_ids"][1, :13].tolist() == [0] * 13
    first, second = batch.layouts[0]
    assert first.positions.tolist() == list(range(4, 20)) and second.positions.tolist() == list(range(23, 39))
    assert batch.layouts[1][0].positions.tolist() == list(range(13 + 4, 13 + 20))
    assert [lay.size for lay in batch.layouts[0]] == [(30, 60), (60, 30)]
    alone = a.prepare([images[1]], [prompts[1]])
    with torch.no_grad():
        both = mllm.model(**batch.inputs).logits[1, -1]
        single = mllm.model(**alone.inputs).logits[0, -1]
    torch.testing.assert_close(both, single, atol=1e-4, rtol=1e-4)


def test_image_tokens_attend_each_other_only_with_token_type_ids(mllm):
    """Layer 0's output: without ``token_type_ids`` the mask is causal, with them an image's tokens
    also see the later tokens of the same image. Every text position and the last image token
    (which sees the whole image either way) are unchanged; the other 15 image tokens change."""
    batch = mllm.prepare([_halves(90, 40, 45)], ["what is it?"])
    inputs = dict(batch.inputs)
    with torch.no_grad():
        bidirectional = mllm.model(**inputs, output_hidden_states=True).hidden_states[1][0]  # [L, D]
        inputs.pop("token_type_ids")
        causal = mllm.model(**inputs, output_hidden_states=True).hidden_states[1][0]  # [L, D]
    changed = (bidirectional - causal).abs().amax(-1) > 1e-5  # [L]
    assert changed.nonzero().flatten().tolist() == list(range(4, 19))


# ---------------------------------------------------------------------------------------- loading
def test_wrap_gives_the_answer_of_load(tiny_dir, mllm):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_dir("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(path)
    model.train()  # wrap puts it in eval mode
    wrapped = innersight.wrap(model, AutoProcessor.from_pretrained(path))
    assert isinstance(wrapped.adapter, Gemma3Adapter) and not model.training
    image = _halves(90, 40, 45)
    ours = wrapped.answer(image, "what is it?", max_new_tokens=3)
    theirs = mllm.answer(image, "what is it?", max_new_tokens=3)
    assert ours.token_ids == theirs.token_ids and ours.token_ids


# ---------------------------------------------------------------------------------------- pan-and-scan
def test_pan_and_scan_boxes_by_hand():
    # 130x40, min crop 32: ratio 3.25 -> floor(3.75) = 3 crops (<= 130 // 32 = 4), 44 px wide
    # (ceil(130 / 3)), the last clipped at the edge
    assert pan_and_scan_boxes(130, 40, 32, 4, 1.2) == [(0.0, 0.0, 44.0, 40.0), (44.0, 0.0, 88.0, 40.0),
                                                       (88.0, 0.0, 130.0, 40.0)]
    # portrait 40x90: ratio 2.25 -> 2 crops of ceil(90 / 2) = 45 px high
    assert pan_and_scan_boxes(40, 90, 32, 4, 1.2) == [(0.0, 0.0, 40.0, 45.0), (0.0, 45.0, 40.0, 90.0)]
    assert pan_and_scan_boxes(40, 40, 32, 4, 1.2) == []  # ratio 1 < 1.2
    assert pan_and_scan_boxes(50, 40, 32, 4, 1.2) == []  # 2 crops of 25 px < 32
    # the released defaults on 1800x600: 3 crops of 600x600
    assert pan_and_scan_boxes(1800, 600, 256, 4, 1.2) == [(0.0, 0.0, 600.0, 600.0), (600.0, 0.0, 1200.0, 600.0),
                                                          (1200.0, 0.0, 1800.0, 600.0)]
    assert pan_and_scan_boxes(4000, 500, 256, 4, 1.2)[-1] == (3000.0, 0.0, 4000.0, 500.0)  # 8 -> at most 4


def test_pan_and_scan_is_off_by_default(mllm):
    # the tiny image processor saves small-image crop settings, with crops off
    assert mllm.adapter.pan_and_scan_settings == {
        "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 32, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    assert mllm.adapter.crop_boxes((900, 100)) == []
    # a released checkpoint saves null for each: Gemma3Processor's defaults apply
    unset = SimpleNamespace(do_pan_and_scan=None, pan_and_scan_min_crop_size=None,
                            pan_and_scan_max_num_crops=None, pan_and_scan_min_ratio_to_activate=None)
    holder = SimpleNamespace(processor=SimpleNamespace(image_processor=unset))
    assert Gemma3Adapter.pan_and_scan_settings.fget(holder) == {
        "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }


def test_pan_and_scan_crops_are_extra_views(pas):
    a = pas.adapter
    assert a.pan_and_scan_settings["do_pan_and_scan"] and a.pan_and_scan_settings["pan_and_scan_min_crop_size"] == 32
    images = [[_halves(90, 40, 45)], [Image.new("RGB", (40, 40), "green")]]
    batch = a.prepare(images, [a.format_prompt("what is it?", 1)] * 2)
    # 90x40: 2 crops (0..45 and 45..90) -> 3 sequences of 16 soft tokens; 40x40: none
    assert tuple(batch.inputs["pixel_values"].shape) == (4, 3, 64, 64)
    layout = batch.layouts[0][0]
    assert layout.num_tokens == int((batch.input_ids[0] == a.image_token_id).sum()) == 48
    assert [(v.name, v.region) for v in layout.views] == [
        ("base", (0.0, 0.0, 90.0, 40.0)), ("crop0", (0.0, 0.0, 45.0, 40.0)), ("crop1", (45.0, 0.0, 90.0, 40.0))]
    assert [v.token_index[0][0] for v in layout.views] == [0, 16, 32]
    assert batch.layouts[1][0].num_tokens == 16
    # the left crop is all red, the right all blue, in the rows of pixel_values after the original
    pixels = batch.inputs["pixel_values"]
    assert bool((pixels[1, 0] > 0.99).all()) and bool((pixels[1, 2] < -0.99).all())
    assert bool((pixels[2, 2] > 0.99).all()) and bool((pixels[2, 0] < -0.99).all())
    sample1, view = a.pixel_view(batch, pixels, 1)  # after the 3 views of sample 0
    torch.testing.assert_close(sample1, pixels[3])
    assert view.name == "base" and view.region == (0.0, 0.0, 40.0, 40.0)
    with torch.no_grad():  # the model takes the 4 views for the 64 soft tokens
        assert bool(torch.isfinite(pas.model(**batch.inputs).logits).all())
