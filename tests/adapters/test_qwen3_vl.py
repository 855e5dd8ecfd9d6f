"""Qwen3-VL adapter contract on the tiny random model.

Tiny processor (see ``innersight.testing.tiny.qwen3_vl``): patch 16, merge 2, so sizes are
multiples of 32; ``min_pixels = 32 * 32 = 1024``, ``max_pixels = 32 * 32 * 16 = 16384``.
``smart_resize(h, w)``: round each side to the nearest multiple of 32 (Python ``round``); if the
area exceeds ``max_pixels`` scale both sides by ``1 / sqrt(h * w / max_pixels)`` and floor to
multiples of 32; if it is below ``min_pixels`` scale by ``sqrt(min_pixels / (h * w))`` and ceil.
Tiny model: 2 decoder layers, 2 vision blocks, DeepStack from vision blocks 0 and 1 added after
decoder layers 0 and 1.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

FAMILY = "qwen3_vl"
PAD, START, END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"


@pytest.fixture(scope="module")
def mllm(tiny_mllm):
    return tiny_mllm(FAMILY)


def _img(w, h, color="red"):
    return Image.new("RGB", (w, h), color)


def _noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _token_id(mllm, token):
    return mllm.adapter.tokenizer.convert_tokens_to_ids(token)


def _image_runs(ids, pad_id):
    """Lengths of the maximal runs of ``pad_id`` in a 1-D id list."""
    runs, n = [], 0
    for t in ids + [None]:
        if t == pad_id:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


# ---------------------------------------------------------------------------------------- modules


def test_modules_and_sizes(mllm):
    a = mllm.adapter
    assert a.family == FAMILY and mllm.model.config.model_type == "qwen3_vl"
    assert type(mllm.model).__name__ == "Qwen3VLForConditionalGeneration" == a.architectures[0]
    assert a.num_layers == len(a.decoder_layers) == 2
    # GQA: 4 query heads share 2 KV heads; head_dim 32 / 4 = 8; Qwen3's per-head q/k norms
    assert (a.num_heads, a.num_kv_heads, a.hidden_size, a.head_dim) == (4, 2, 32, 8)
    attn = a.decoder_layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 8 and attn.q_norm.weight.shape == (8,)
    assert a.vision_tower is mllm.model.model.visual
    assert a.vision_layers is mllm.model.model.visual.blocks and len(a.vision_layers) == 2
    assert hasattr(a.vision_layers[0].attn, "qkv")  # fused q/k/v projection in the vision blocks
    assert a.language_model is mllm.model.model.language_model
    assert a.final_norm is mllm.model.model.language_model.norm
    assert a.lm_head is mllm.model.lm_head
    assert (a.vision_feature_layer, a.spatial_merge_size, a.patch_size) == (-1, 2, 16)
    assert a.image_token_id == _token_id(mllm, PAD)
    d = a.describe()
    assert (d["spatial_merge_size"], d["patch_size"], d["deepstack_vision_layers"]) == (2, 16, [0, 1])


def test_deepstack_and_projector_layers(mllm):
    a = mllm.adapter
    assert a.deepstack_vision_layers == (0, 1)
    assert a.deepstack_decoder_layers == (0, 1)
    assert a.projector_vision_layers == (0, 1)  # DeepStack levels {0, 1} and the last block (1)
    assert a.projector_vision_layer == 1


def test_projector_vision_layers_are_the_mergers_inputs(mllm):
    """transformers' own semantics: merger ``j``'s input is the output of vision block
    ``deepstack_vision_layers[j]``, the main merger's input the last block's output."""
    a = mllm.adapter
    batch = mllm.prepare([_noise(96, 64)], ["what?"])
    seen: dict = {}
    tower = a.vision_tower
    hooks = [blk.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("block", i), out))
             for i, blk in enumerate(a.vision_layers)]
    hooks += [mrg.register_forward_pre_hook(lambda m, args, j=j: seen.__setitem__(("deep", j), args[0]))
              for j, mrg in enumerate(tower.deepstack_merger_list)]
    hooks.append(tower.merger.register_forward_pre_hook(lambda m, args: seen.__setitem__("main", args[0])))
    try:
        with torch.no_grad():
            a.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"])
    finally:
        for h in hooks:
            h.remove()
    for j, layer in enumerate(a.deepstack_vision_layers):
        assert torch.equal(seen[("deep", j)], seen[("block", layer)])
    assert torch.equal(seen["main"], seen[("block", len(a.vision_layers) - 1)])


def test_deepstack_is_added_at_image_positions_after_the_named_decoder_layers(mllm):
    """The residual stream entering decoder layer ``j + 1`` (or the final norm) minus layer
    ``j``'s output is DeepStack level ``j`` at the image positions and zero elsewhere."""
    a = mllm.adapter
    batch = mllm.prepare([[_noise(96, 64, 1), _noise(40, 120, 2)]], ["compare them"])
    with torch.no_grad():
        image_out = a.model.model.get_image_features(batch.inputs["pixel_values"], batch.inputs["image_grid_thw"])
    levels = a.deepstack_features(image_out)
    assert [tuple(x.shape) for x in levels] == [(6 + 4, 32)] * 2  # 96x64 -> 2x3, 40x120 -> 4x1 tokens
    outs, ins = {}, {}
    consumers = [*a.decoder_layers[1:], a.final_norm]
    hooks = [layer.register_forward_hook(lambda m, args, out, j=j: outs.__setitem__(j, out))
             for j, layer in enumerate(a.decoder_layers)]
    hooks += [mod.register_forward_pre_hook(lambda m, args, j=j: ins.__setitem__(j, args[0]))
              for j, mod in enumerate(consumers)]
    try:
        with torch.no_grad():
            mllm.model(**batch.inputs)
    finally:
        for h in hooks:
            h.remove()
    image = batch.input_ids[0] == a.image_token_id  # [L]
    positions = torch.cat([lay.positions for lay in batch.layouts[0]])
    assert torch.equal(image.nonzero()[:, 0], positions)
    for j in a.deepstack_decoder_layers:
        added = (ins[j] - outs[j])[0]  # [L, D]
        torch.testing.assert_close(added[image], levels[j], atol=1e-5, rtol=1e-4)
        assert float(added[~image].abs().max()) == 0.0


def _stream_into_layer_one(mllm, **inputs):
    """The hidden states [B, L, D] entering decoder layer 1 (layer 0's output plus DeepStack level 0)."""
    seen = {}
    hook = mllm.adapter.decoder_layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("h", args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = mllm.model(**inputs).logits
    finally:
        hook.remove()
    return seen["h"], out


def test_decoder_injections_are_deepstack_and_a_built_prompt_reproduces_the_prefill(mllm):
    """image_rows: one vision pass, merged tokens + DeepStack rows per image; a forward on the
    prompt's embeddings inside ``injecting`` equals the model's own prefill, without it it does not
    (image positions after layer 0); residual_additions reads level j's rows for layer j."""
    a = mllm.adapter
    batch = mllm.prepare([[_noise(96, 64, 1), _noise(40, 120, 2)]], ["compare them"])
    assert a.image_injection_layers == a.deepstack_decoder_layers == (0, 1)
    with torch.no_grad():
        rows = a.image_rows(batch, batch.inputs["pixel_values"])
        levels = a.deepstack_features(a.model.model.get_image_features(batch.inputs["pixel_values"],
                                                                       batch.inputs["image_grid_thw"]))
    assert [r.embeds.shape[0] for r in rows] == [6, 4] and [tuple(r.injected.shape) for r in rows] == [(2, 6, 32),
                                                                                                        (2, 4, 32)]
    injected = torch.cat([r.injected for r in rows], dim=1)  # [S, N, D]
    torch.testing.assert_close(injected, torch.stack(levels))
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]
    embeds = a.language_model.get_input_embeddings()(ids).clone()  # [1, L, D]
    image = ids == a.image_token_id  # [1, L]
    embeds[image] = torch.cat([r.embeds for r in rows])
    with torch.no_grad():
        positions = a.prompt_positions(batch, ids, mask, [[6, 4]])
    own_stream, own = _stream_into_layer_one(mllm, **batch.inputs)
    with a.injecting(ids, injected), a.residual_additions() as added:
        built_stream, built = _stream_into_layer_one(mllm, inputs_embeds=embeds, attention_mask=mask,
                                                     position_ids=positions)
        assert torch.equal(added(0)[0], image) and torch.equal(added(1)[1], injected[1]) and added(2) is None
    torch.testing.assert_close(built, own, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(built_stream, own_stream, atol=1e-5, rtol=1e-4)
    plain_stream, _ = _stream_into_layer_one(mllm, inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(plain_stream[~image], own_stream[~image], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain_stream[image], own_stream[image] - injected[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain_stream[image], own_stream[image], atol=1e-4)
    # the hooks are gone after the blocks; rows that do not fit the prompt are refused
    assert not a.language_model._forward_pre_hooks
    from innersight.errors import MethodError

    with pytest.raises(MethodError, match="qwen3_vl.*DeepStack rows"):
        with a.injecting(ids, injected[:, :-1]):
            pass
    with pytest.raises(MethodError, match="qwen3_vl.*another"):
        with a.injecting(ids[:, 1:], injected), torch.no_grad():
            mllm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    assert not a.language_model._forward_pre_hooks


# ---------------------------------------------------------------------------------------- tokens


def test_token_count_is_grid_over_merge_squared(mllm):
    a = mllm.adapter
    # 64x48: h 48/32 = 1.5 -> round 2 -> 64, w 64/32 = 2 -> 64; 64*64 = 4096 in [1024, 16384]
    # -> grid_thw [1, 4, 4] patches -> 16 / 2^2 = 4 tokens (2x2 merged)
    batch = mllm.prepare([_img(64, 48)], ["what is the color?"])
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch.inputs["pixel_values"].shape == (16, 3 * 2 * 16 * 16)  # [patches, C * T * ps * ps]
    (layout,) = batch.layouts[0]
    ids = batch.input_ids[0].tolist()
    assert layout.num_tokens == 4 == _image_runs(ids, a.image_token_id)[0]
    pos = layout.positions.tolist()
    assert pos == list(range(pos[0], pos[0] + 4))
    assert ids[pos[0] - 1] == _token_id(mllm, START) and ids[pos[-1] + 1] == _token_id(mllm, END)
    with torch.no_grad():
        feats = mllm.model.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_grid_thw"]
        ).pooler_output
    assert [f.shape[0] for f in feats] == [4]


def test_two_images_in_one_prompt(mllm):
    a = mllm.adapter
    # 96x40: h 40/32 = 1.25 -> 32, w 96/32 = 3 -> 96 -> [1, 2, 6] -> 12 / 4 = 3 tokens
    # 40x120: h 120/32 = 3.75 -> 128, w 40/32 = 1.25 -> 32 -> [1, 8, 2] -> 16 / 4 = 4 tokens
    batch = mllm.prepare([[_img(96, 40), _img(40, 120)]], ["compare them"])
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 2, 6], [1, 8, 2]]
    first, second = batch.layouts[0]
    assert (first.num_tokens, second.num_tokens) == (3, 4)
    assert _image_runs(batch.input_ids[0].tolist(), a.image_token_id) == [3, 4]
    assert first.positions.max() < second.positions.min()
    assert (first.size, second.size) == ((96, 40), (40, 120))


def test_mrope_positions_by_hand(mllm):
    """Interleaved M-RoPE positions of a one-image prompt, computed by hand: text tokens count up
    on all rows; the 4x1 image (40x120) at text position ``s`` gets temporal ``s``, height
    ``s + row``, width ``s``; the text after it resumes at ``s + max(4, 1)``."""
    a = mllm.adapter
    batch = mllm.prepare([_img(40, 120)], ["what?"])
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]
    (layout,) = batch.layouts[0]
    s = int(layout.positions[0])
    positions = a.prompt_positions(batch, ids, mask, [[4]])  # [4, 1, L]
    length = ids.shape[1]
    image = layout.positions.tolist()
    assert positions[0, 0].tolist() == list(range(length))  # the text row: 0..L-1
    expected = []
    for row in range(3):
        values = list(range(s))
        values += [s] * 4 if row != 1 else [s + r for r in range(4)]
        values += list(range(s + 4, s + 4 + length - s - 4))
        expected.append(values)
    assert positions[1:, 0].tolist() == expected
    assert image == list(range(s, s + 4))
    # the model's own positions when generate builds them
    with torch.no_grad():
        own = a.model._prepare_position_ids_for_generation(ids, dict(batch.inputs))
    assert torch.equal(own, positions)


# ---------------------------------------------------------------------------------------- geometry

# (width, height) -> (rows, cols) of merged tokens, computed by hand with smart_resize (factor 32):
GEOMETRY = [
    # wide 96x40 -> 32 x 96 px -> 1 x 3 tokens; cells 96/3 = 32 px wide, 40 px tall
    ((96, 40), (1, 3)),
    # tall 40x120 -> 128 x 32 px -> 4 x 1 tokens; cells 40 px wide, 120/4 = 30 px tall
    ((40, 120), (4, 1)),
    # large 300x200: rounded 192 x 288 = 55296 > 16384, beta = sqrt(60000 / 16384) = 1.914;
    # h = floor(200 / 1.914 / 32) = floor(3.27) = 3 -> 96, w = floor(300 / 1.914 / 32) = floor(4.90) = 4
    # -> 128 -> 3 x 4 tokens; cells 300/4 = 75 px wide, 200/3 = 66.67 px tall
    ((300, 200), (3, 4)),
    # small 10x30: rounded 32 x 0 = 0 < 1024, beta = sqrt(1024 / 300) = 1.848;
    # h = ceil(30 * 1.848 / 32) = ceil(1.73) = 2 -> 64, w = ceil(10 * 1.848 / 32) = ceil(0.58) = 1 -> 32
    # -> 2 x 1 tokens; cells 10 px wide, 15 px tall
    ((10, 30), (2, 1)),
]


@pytest.mark.parametrize(("size", "grid"), GEOMETRY)
def test_grid_and_cell_boxes_follow_smart_resize(mllm, size, grid):
    w, h = size
    rows, cols = grid
    (layout,) = mllm.prepare([_img(w, h)], ["where is the cat?"]).layouts[0]
    (view,) = layout.views
    assert view.name == "merged"
    assert (view.rows, view.cols) == (rows, cols)
    assert layout.num_tokens == rows * cols
    # smart_resize stretches the whole image: the grid covers exactly the original image
    assert view.region == (0.0, 0.0, float(w), float(h))
    cw, ch = w / cols, h / rows
    last_r, last_c = rows - 1, cols - 1
    assert view.cell_box(last_r, last_c) == pytest.approx((last_c * cw, last_r * ch, float(w), float(h)))
    assert view.token_index[last_r][last_c] == rows * cols - 1


def test_explicit_cell_boxes(mllm):
    (wide,) = mllm.prepare([_img(96, 40)], ["what?"]).layouts[0]
    assert wide.views[0].cell_box(0, 1) == pytest.approx((32.0, 0.0, 64.0, 40.0))
    (tall,) = mllm.prepare([_img(40, 120)], ["what?"]).layouts[0]
    assert tall.views[0].cell_box(2, 0) == pytest.approx((0.0, 60.0, 40.0, 90.0))
    assert tall.views[0].token_index == ((0,), (1,), (2,), (3,))
    (large,) = mllm.prepare([_img(300, 200)], ["what?"]).layouts[0]
    assert large.views[0].cell_box(1, 2) == pytest.approx((150.0, 200 / 3, 225.0, 400 / 3))
    assert large.views[0].token_index[1][2] == 6


def _merged_features(mllm, image):
    """Main-merger output tokens of ``image`` with every vision block bypassed (identity) and the
    learned position embedding zeroed, so that each merged token depends only on the pixels of its
    own 2x2 patch block."""
    a = mllm.adapter
    batch = mllm.prepare([image], ["what?"])
    tower = a.vision_tower
    handles = [blk.register_forward_hook(lambda mod, args, out: args[0]) for blk in tower.blocks]
    handles.append(tower.pos_embed.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)))
    try:
        with torch.no_grad():
            out = tower(batch.inputs["pixel_values"], grid_thw=batch.inputs["image_grid_thw"])
    finally:
        for handle in handles:
            handle.remove()
    return out.pooler_output, batch.layouts[0][0]  # [T, D]


@pytest.mark.parametrize("size", [(96, 64), (96, 40), (40, 120)])
def test_token_order_matches_cell_boxes(mllm, size):
    """Paint one cell's box white: the token that changes is that cell's token (row-major merge
    order)."""
    base, layout = _merged_features(mllm, _img(*size, "black"))
    view = layout.views[0]
    exact = size == (96, 64)  # 96x64 is already a multiple of 32: no resampling blur
    for r in range(view.rows):
        for c in range(view.cols):
            img = _img(*size, "black")
            x0, y0, x1, y1 = view.cell_box(r, c)
            margin = 0 if exact else 3
            ImageDraw.Draw(img).rectangle((x0 + margin, y0 + margin, x1 - 1 - margin, y1 - 1 - margin), fill="white")
            feats, _ = _merged_features(mllm, img)
            change = (feats - base).abs().sum(-1)  # [T]
            assert int(change.argmax()) == view.token_index[r][c]
            if exact:
                others = torch.cat([change[: view.token_index[r][c]], change[view.token_index[r][c] + 1 :]])
                assert float(others.max()) < 1e-5 < float(change.max())


def test_vision_patch_token_index_matches_the_mergers(mllm):
    """Merging the tower's hidden-state rows that the adapter assigns to token k reproduces the
    tower's own output token k (96x64 is a 2x3 merged grid -> 24 patches; 128x128 is 4x4 -> 64),
    for the main merger and the DeepStack merger of the last block alike."""
    a = mllm.adapter
    batch = mllm.prepare([[_noise(96, 64, 3), _noise(128, 128, 4)]], ["compare them"])
    outs = {}
    last = len(a.vision_layers) - 1
    hook = a.vision_layers[last].register_forward_hook(lambda m, args, out: outs.__setitem__("hidden", out))
    try:
        with torch.no_grad():
            out = a.vision_tower(batch.inputs["pixel_values"], grid_thw=batch.inputs["image_grid_thw"])
    finally:
        hook.remove()
    hidden = outs["hidden"]  # [P_total, D_vision]
    pooled = out.pooler_output  # [T_total, D]
    deep = out.deepstack_features[a.deepstack_vision_layers.index(last)]  # [T_total, D]
    assert a.vision_patch_range(batch, 0) == (0, 24) and a.vision_patch_range(batch, 1) == (24, 88)
    token_offset = 0
    with torch.no_grad():
        for i, layout in enumerate(batch.layouts[0]):
            start, stop = a.vision_patch_range(batch, i)
            index = a.vision_patch_token_index(batch, i)  # [P]
            assert index.shape == (stop - start,)
            rows = hidden[start:stop]
            for k in range(layout.num_tokens):
                torch.testing.assert_close(a.vision_tower.merger(rows[index == k])[0], pooled[token_offset + k],
                                           atol=1e-5, rtol=1e-4)
                merger = a.vision_tower.deepstack_merger_list[a.deepstack_vision_layers.index(last)]
                torch.testing.assert_close(merger(rows[index == k])[0], deep[token_offset + k], atol=1e-5, rtol=1e-4)
            token_offset += layout.num_tokens
    assert a.vision_patch_token_index(batch, 0)[::4].tolist() == [0, 1, 2, 3, 4, 5]


def test_pixel_view_rebuilds_the_processed_image(mllm):
    """96x64 needs no resize (multiples of 32), so the processed image is the normalised original
    (mean = std = 0.5)."""
    a = mllm.adapter
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)  # [H, W, C]
    batch = mllm.prepare([_img(64, 48), Image.fromarray(arr)], ["what?", "what is the color of the cat?"])
    pixels, view = a.pixel_view(batch, batch.inputs["pixel_values"], 1)  # [3, 64, 96]
    expected = ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)  # [3, H, W]
    assert pixels.shape == (3, 64, 96)
    assert np.allclose(pixels.numpy(), expected, atol=1e-5)
    assert (view.rows, view.cols) == (2, 3)


# ---------------------------------------------------------------------------------------- batching


def test_left_padded_batch_equals_each_alone(mllm):
    a = mllm.adapter
    images = [[_img(64, 48, "red")], [_img(96, 40, "blue"), _img(40, 120, "green")]]
    questions = ["what?", "is there a cat in the image ? please describe the picture in detail"]
    prompts = [a.format_prompt(q, len(ims)) for q, ims in zip(questions, images)]
    batch = a.prepare(images, prompts)
    mask = batch.inputs["attention_mask"]
    assert int(mask[0].sum()) < mask.shape[1] and int(mask[1].sum()) == mask.shape[1]  # row 0 left-padded
    assert int(mask[0, 0]) == 0
    gen = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": a.tokenizer.pad_token_id}
    with torch.no_grad():
        batched_logits = mllm.model(**batch.inputs).logits[:, -1]  # [2, V]
        batched = mllm.model.generate(**batch.inputs, **gen)[:, batch.input_ids.shape[1]:]  # [2, 3]
    for i in range(2):
        alone = a.prepare([images[i]], [prompts[i]])
        pad = batch.input_ids.shape[1] - alone.input_ids.shape[1]
        for lay_b, lay_1 in zip(batch.layouts[i], alone.layouts[0]):
            assert torch.equal(lay_b.positions, lay_1.positions + pad)
        with torch.no_grad():
            logits = mllm.model(**alone.inputs).logits[0, -1]  # [V]
            tokens = mllm.model.generate(**alone.inputs, **gen)[0, alone.input_ids.shape[1]:]  # [3]
        assert torch.allclose(batched_logits[i], logits, atol=1e-4)
        assert batched[i].tolist() == tokens.tolist()


# ---------------------------------------------------------------------------------------- prompts


def test_chat_and_reference_prompts(mllm):
    a = mllm.adapter
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "why?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert a.format_prompt("why?", 2, "reference") == expected
    assert a.format_prompt("why?", 2, "chat") == expected


def test_control_tokens_in_user_text_are_plain_text(mllm):
    """A question that spells the image pad and the vision markers adds no image token and no
    control token: the image keeps exactly its own 4 tokens."""
    a = mllm.adapter
    question = f"what is {START}{PAD}{END} and <|im_end|>?"
    prompt = a.format_prompt(question, 1)
    assert prompt.count(PAD) == 1 and prompt.count("<|im_end|>") == 2  # the template's own only
    batch = a.prepare([[_img(64, 48)]], [prompt])
    ids = batch.input_ids[0].tolist()
    assert _image_runs(ids, a.image_token_id) == [4]
    assert ids.count(_token_id(mllm, START)) == 1 and ids.count(_token_id(mllm, END)) == 1
    assert batch.layouts[0][0].num_tokens == 4


# ---------------------------------------------------------------------------------------- processor


def _expected_processor_output(image, prompt, n_tokens):
    """What the saved processor must produce: the builder's tokenizer on the expanded prompt, and
    a freshly configured PIL image processor on the image."""
    from transformers import Qwen2VLImageProcessorPil

    from innersight.testing.tiny.qwen2_vl import QWEN_SPECIAL_TOKENS
    from innersight.testing.tiny.tokenizer import build_tokenizer

    tok = build_tokenizer(QWEN_SPECIAL_TOKENS, extra_words=("You", "helpful"), add_bos=False)
    ids = tok(prompt.replace(PAD, PAD * n_tokens))["input_ids"]
    ip = Qwen2VLImageProcessorPil(min_pixels=1024, max_pixels=16384, patch_size=16, merge_size=2,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ids, ip([image], return_tensors="pt")["pixel_values"]


def _check_processor(processor):
    import transformers

    from innersight.testing.tiny.qwen2_vl import QWEN_CHAT_TEMPLATE

    assert isinstance(processor, transformers.Qwen3VLProcessor)
    assert processor.chat_template == QWEN_CHAT_TEMPLATE
    assert (processor.vision_start_token, processor.vision_end_token) == (START, END)
    image = _img(64, 48, "blue")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out = processor(text=[prompt], images=[image], return_tensors="pt")
    ids, pixels = _expected_processor_output(image, prompt, 4)  # 64x48 -> 4 tokens (see above)
    assert out["input_ids"][0].tolist() == ids
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(out["pixel_values"], pixels)
    assert out["mm_token_type_ids"][0].tolist() == [int(t == processor.image_token_id) for t in ids]


def _adapter_class():
    from innersight.adapters import adapter_class

    return adapter_class(FAMILY)


def test_processor_loads_offline(tiny_dir):
    from transformers.utils import is_torchvision_available

    processor = _adapter_class().load_processor(str(tiny_dir(FAMILY)))
    _check_processor(processor)
    if not is_torchvision_available():
        assert type(processor).__name__ == "Qwen3VLImageTextProcessor"
        assert not hasattr(processor, "video_processor")


def test_processor_loads_from_hub_layout(tiny_dir, tmp_path):
    """The released checkpoints ship ``chat_template.json`` and a ``preprocessor_config.json``
    with ``size = {longest_edge, shortest_edge}``."""
    src = tiny_dir(FAMILY)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": (src / "chat_template.jinja").read_text()}))
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": 16384, "shortest_edge": 1024}
    assert pre["processor_class"] == "Qwen3VLProcessor"
    _check_processor(_adapter_class().load_processor(str(tmp_path)))


def test_processor_survives_save_pretrained(tiny_dir, tmp_path):
    cls = _adapter_class()
    processor = cls.load_processor(str(tiny_dir(FAMILY)))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen3VLProcessor"
    _check_processor(cls.load_processor(str(tmp_path)))


def test_processor_missing_directory_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        _adapter_class().load_processor(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------- wrap


def test_wrap_a_model_loaded_by_hand(tiny_dir, mllm):
    import transformers

    import innersight

    path = str(tiny_dir(FAMILY))
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(path)
    processor = _adapter_class().load_processor(path)
    wrapped = innersight.wrap(model, processor, name="mine")
    assert wrapped.adapter.family == FAMILY and wrapped.name == "mine"
    image, question = _noise(90, 60, 5), "what is it?"
    assert wrapped.answer(image, question, max_new_tokens=3).token_ids == mllm.answer(
        image, question, max_new_tokens=3).token_ids
