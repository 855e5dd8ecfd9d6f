"""Contract tests of the LLaVA-OneVision adapter against a tiny random LlavaOnevisionForConditionalGeneration.

The tiny model (testing/tiny/llava_onevision.py): 42 px tiles, 14 px patches, so p = 3 feature
cells per tile side and 9 base tokens (SigLIP: no CLS); pinpoints (h, w) = 42x42, 42x84, 84x42,
84x84; ``anyres_max_2``: an unpadded grid of R x C cells is pooled when
``ratio = sqrt(R * C / (2 * 9)) > 1.1``, i.e. R * C > 21.78, to ``int(R // ratio) x int(C // ratio)``.
A tiled image (alone in its sample) has ``9 + R' * (C' + 1)`` tokens; an image sharing its sample
``9 + 1``. Expected numbers below are worked out by hand from transformers' rules
(select_best_resolution, get_patch_output_size, unpad_image, pack_image_features), not taken
from the adapter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import innersight
from innersight.adapters import adapter_class
from innersight.adapters.base import WORD_JOINER
from innersight.adapters.llava_onevision import LlavaOnevisionAdapter, max_num_patches, pooled_grid
from innersight.errors import UnsupportedModelError

# Token counts worked out by hand (W x H):
# 42x42: best 42x42 (1 tile) -> 3x3 grid, square: nothing unpadded, 9 cells (no pooling) -> 9 + 3*4 = 21
# 64x64: best 84x84 (effective 64x64 = 4096 px beats 42x42's 1764) -> 6x6 grid, square, 36 cells;
#        ratio sqrt(36/18) = 1.414 -> int(6 // 1.414) = int(4.24) = 4 -> 4x4 -> 9 + 4*5 = 29
# 90x60: best 84x84 (scale min(84/90, 84/60) = 0.933 -> 84x56 = 4704 px; 42x84 gives 63x42 = 2646)
#        -> 6x6 grid; aspect 1.5 > 1 -> new_h = int(round(60*6/90)) = 4, pad (6-4)//2 = 1 -> 4x6,
#        24 cells; ratio sqrt(24/18) = 1.1547 -> int(4 // 1.1547) = 3, int(6 // 1.1547) = 5 -> 3x5
#        -> 9 + 3*6 = 27
# 40x90: best h84 x w42 (scale 0.933 -> 37x84 = 3108 px, as 84x84 but with less waste) -> 6x3
#        grid; aspect 0.444 < 0.5 -> new_w = int(round(40*6/90, 7)) = int(2.667) = 2, pad 0
#        -> 6x3, 18 cells (no pooling) -> 9 + 6*4 = 33
EXPECTED_TOKENS = {(42, 42): 21, (64, 64): 29, (90, 60): 27, (40, 90): 33}


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def adapter(tiny_dir) -> LlavaOnevisionAdapter:
    from transformers import AutoModelForImageTextToText

    path = tiny_dir("llava_onevision")
    processor = LlavaOnevisionAdapter.load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return LlavaOnevisionAdapter(model, processor)


def prompt(question: str, n: int = 1) -> str:
    """A chat-format prompt written out (the tiny tokenizer drops the newlines)."""
    return "<|im_start|>user\n" + "<image>\n" * n + question + "<|im_end|>\n<|im_start|>assistant\n"


def features(adapter: LlavaOnevisionAdapter, batch) -> list[torch.Tensor]:
    """The model's own packed image features of a batch: one [T_img, D] tensor per image."""
    with torch.no_grad():
        return adapter.model.get_image_features(
            pixel_values=batch.inputs["pixel_values"], image_sizes=batch.inputs["image_sizes"],
            batch_num_images=batch.inputs["batch_num_images"],
        ).pooler_output


def test_registry_and_modules(adapter: LlavaOnevisionAdapter) -> None:
    assert adapter_class("llava_onevision") is LlavaOnevisionAdapter
    assert adapter.language_model is adapter.model.model.language_model
    assert len(adapter.decoder_layers) == 2 and adapter.final_norm is adapter.language_model.norm
    assert adapter.vision_tower is adapter.model.model.vision_tower
    assert type(adapter.vision_tower).__name__ == "SiglipVisionModel"
    assert adapter.lm_head is adapter.model.lm_head
    assert adapter.image_newline is adapter.model.model.image_newline
    # SigLIP's last layer (-1 of 3 hidden states = output of layers[1]), no CLS
    assert adapter.vision_feature_layer == -1 and adapter.projector_vision_layer == 1
    assert len(adapter.vision_layers) == 2
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (2, 4, 2, 8)
    assert adapter.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert (adapter.tile_size, adapter.patches_per_side, adapter.max_num_patches) == (42, 3, 2)
    assert adapter.crop_base_size == 42


def test_anyres_max_arithmetic_by_hand() -> None:
    assert max_num_patches("anyres_max_9") == 9 and max_num_patches("anyres_max_2") == 2
    with pytest.raises(UnsupportedModelError, match="anyres_max_N"):
        max_num_patches("pad")
    # released models: p = 27, N = 9 -> pooled when R*C > 1.21 * 6561 = 7938.8
    assert pooled_grid(54, 54, 27, 9) == (54, 54)  # 2x2 tiles: ratio 0.667
    assert pooled_grid(162, 162, 27, 9) == (81, 81)  # 6x6 tiles: ratio 162/81 = 2
    # 3x6 tiles: ratio sqrt(81*162/6561) = 1.41421; 81/1.41421 = 57.28, 162/1.41421 = 114.55
    assert pooled_grid(81, 162, 27, 9) == (57, 114)
    # the threshold is 1.1, not 1: 90x90 cells give ratio 90/81 = 1.111 (pooled), 88x88 1.086 (kept);
    # in floats the ratio is 1.1111111111111112 (rounded up), so 90 // ratio = 80.99.. -> 80, not 81
    assert pooled_grid(90, 90, 27, 9) == (80, 80)
    assert pooled_grid(88, 88, 27, 9) == (88, 88)


def test_token_counts_agree_with_transformers_over_a_sweep_of_sizes(adapter: LlavaOnevisionAdapter) -> None:
    """The adapter's count equals the processor's own ``_get_number_of_features`` for every size
    from 10 to 200 px in steps of 19 (pooled and unpooled, wide and tall), tiled and not."""
    processor = adapter.processor
    sizes = [(w, h) for w in range(10, 201, 19) for h in range(10, 201, 19)]
    pooled = 0
    for w, h in sizes:
        expected = processor._get_number_of_features(h, w, 42, 42)
        lay = adapter.onevision_layout((w, h))
        assert lay.num_tokens == expected, (w, h)
        pooled += (lay.rows, lay.cols) != (lay.anyres.rows, lay.anyres.cols)
        assert adapter.onevision_layout((w, h), tiled=False).num_tokens == processor.num_image_tokens + 1
    assert 0 < pooled < len(sizes)  # the sweep covers both sides of the threshold


def test_prompt_templates(adapter: LlavaOnevisionAdapter) -> None:
    assert adapter.format_prompt("what is it?", 2, template="chat") == (
        "<|im_start|>user\n<image>\n<image>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    # the official conversation format (qwen_1_5) with its default system turn
    assert adapter.format_prompt("what is it?", 1, template="reference") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("size", sorted(EXPECTED_TOKENS))
def test_token_count_matches_processor_and_model(adapter: LlavaOnevisionAdapter, size: tuple[int, int]) -> None:
    batch = adapter.prepare([[noise(*size, seed=1)]], [prompt("what is this?")])
    (layout,) = batch.layouts[0]
    n_ids = int((batch.input_ids == adapter.image_token_id).sum())
    feats = features(adapter, batch)
    assert layout.num_tokens == EXPECTED_TOKENS[size]
    assert n_ids == EXPECTED_TOKENS[size]
    assert feats[0].shape[0] == EXPECTED_TOKENS[size]
    base, high = layout.views
    assert base.rows * base.cols + high.rows * (high.cols + 1) == layout.num_tokens


def test_geometry_of_pooled_and_unpadded_grids(adapter: LlavaOnevisionAdapter) -> None:
    # 90x60 (see EXPECTED_TOKENS): canvas 84x84; scale_w 0.933 < scale_h 1.4 -> resized to w 84,
    # h ceil(60*84/90) = 56, pasted at y = (84-56)//2 = 14. Unpadding drops canvas feature rows 0
    # and 5: canvas y 14..70 = original y (14-14)*60/56 = 0 .. (70-14)*60/56 = 60: the whole image.
    # Pooling 4x6 -> 3x5 keeps that region, so pooled cells are 18 x 20 px (1.2 x 1.33 input cells).
    base, high = adapter.views(None, 0, (90, 60))
    assert (base.name, base.rows, base.cols, base.region) == ("base", 3, 3, (0.0, 0.0, 90.0, 60.0))
    assert (high.name, high.rows, high.cols) == ("highres", 3, 5)
    assert high.region == pytest.approx((0.0, 0.0, 90.0, 60.0))
    assert high.cell_box(1, 2) == pytest.approx((36.0, 20.0, 54.0, 40.0))
    assert high.cell_box(2, 4) == pytest.approx((72.0, 40.0, 90.0, 60.0))
    # base tokens 0..8 (no newline), then 3 rows of 5 cells each followed by a newline
    assert base.token_index == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    assert high.token_index == ((9, 10, 11, 12, 13), (15, 16, 17, 18, 19), (21, 22, 23, 24, 25))
    assert adapter.newline_token_indices((90, 60)) == [14, 20, 26]
    # 64x64: canvas 84x84 filled (scale 1.3125 both ways), 6x6 -> 4x4: 16 px cells
    _, high = adapter.views(None, 0, (64, 64))
    assert (high.rows, high.cols, high.region) == (4, 4, (0.0, 0.0, 64.0, 64.0))
    assert high.cell_box(1, 2) == pytest.approx((32.0, 16.0, 48.0, 32.0))
    # 40x90: canvas h84 x w42; scale_h 0.933 < scale_w 1.05 -> h 84, w ceil(40*84/90) = ceil(37.33)
    # = 38, pasted at x = (42-38)//2 = 2; nothing unpadded, no pooling: canvas x 0..42 = original
    # x (0-2)*40/38 = -2.105 .. (42-2)*40/38 = 42.105 (the grid reaches into the padding)
    _, high = adapter.views(None, 0, (40, 90))
    assert (high.rows, high.cols) == (6, 3)
    assert high.region == pytest.approx((-80 / 38, 0.0, 1600 / 38, 90.0))
    assert high.cell_box(0, 0) == pytest.approx((-80 / 38, 0.0, 480 / 38, 15.0))  # width 1680/38 / 3 = 560/38


def test_token_order_and_pooling_follow_the_views(adapter: LlavaOnevisionAdapter) -> None:
    """Each LM image token carries the feature the views say it does, the pooled ones included."""
    size = (90, 60)  # canvas 2x2 tiles of 3x3 cells; unpadded canvas rows 1..4 (4x6), pooled to 3x5
    batch = adapter.prepare([[noise(*size, seed=2)]], [prompt("what is this?")])
    packed = features(adapter, batch)[0]  # [27, D]
    with torch.no_grad():
        tiles = batch.inputs["pixel_values"][0, :5]  # [5, 3, 42, 42]: base + 4 tiles (row-major)
        hidden = adapter.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]  # [5, 9, Dv]
        proj = adapter.model.model.multi_modal_projector(hidden)  # [5, 9, D]
    base, high = batch.layouts[0][0].views
    for r in range(3):
        for c in range(3):
            torch.testing.assert_close(packed[base.token_index[r][c]], proj[0, r * 3 + c])

    def canvas(row: int, col: int) -> torch.Tensor:
        """The projected feature of canvas cell (row, col): tile (row//3, col//3), patch (row%3, col%3)."""
        return proj[1 + (row // 3) * 2 + col // 3, (row % 3) * 3 + col % 3]

    # bilinear, align_corners=False, 4x6 -> 3x5: pooled (1, 2) samples unpadded y = 1.5*4/3 - 0.5 =
    # 1.5 and x = 2.5*6/5 - 0.5 = 2.5: the mean of unpadded cells (1..2, 2..3) = canvas rows 2..3
    expected = (canvas(2, 2) + canvas(2, 3) + canvas(3, 2) + canvas(3, 3)) / 4
    torch.testing.assert_close(packed[high.token_index[1][2]], expected)
    # ...whose centre (x 2.5+0.5 = 3 cells * 15 px = 45, y 2 * 15 = 30) is the centre of the view's cell box
    x0, y0, x1, y1 = high.cell_box(1, 2)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((45.0, 30.0))
    # pooled (0, 0): y = 0.5*4/3 - 0.5 = 1/6, x = 0.5*6/5 - 0.5 = 0.1 -> weights (5/6, 1/6) x (0.9, 0.1)
    # over unpadded rows 0..1 = canvas rows 1..2, cols 0..1
    expected = (5 / 6 * (0.9 * canvas(1, 0) + 0.1 * canvas(1, 1)) + 1 / 6 * (0.9 * canvas(2, 0) + 0.1 * canvas(2, 1)))
    torch.testing.assert_close(packed[high.token_index[0][0]], expected)
    for i in adapter.newline_token_indices(size):
        torch.testing.assert_close(packed[i], adapter.model.model.image_newline)

    # an unpooled image: every high-resolution token is one canvas cell (40x90: 2x1 tiles, 6x3 cells)
    batch = adapter.prepare([[noise(40, 90, seed=3)]], [prompt("what is this?")])
    packed = features(adapter, batch)[0]  # [33, D]
    with torch.no_grad():
        tiles = batch.inputs["pixel_values"][0, :3]  # [3, 3, 42, 42]: base + 2 tiles stacked vertically
        proj = adapter.model.model.multi_modal_projector(
            adapter.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
        )  # [3, 9, D]
    _, high = batch.layouts[0][0].views
    for r in range(6):
        for c in range(3):
            torch.testing.assert_close(packed[high.token_index[r][c]], proj[1 + r // 3, (r % 3) * 3 + c])


def test_two_images_in_one_prompt_and_left_padded_batch(adapter: LlavaOnevisionAdapter) -> None:
    # a sample with two images is not tiled: each image is padded to a square, 9 tokens + 1 newline.
    # sample 0: "<|im_start|> user <image>x10 left <image>x10 right what is this ? <|im_end|>
    #            <|im_start|> assistant" = 2 + 10 + 1 + 10 + 5 + 3 = 31 tokens (no BOS; newlines
    #            are whitespace to the tiny tokenizer)
    # sample 1: one 40x90 image (33 tokens): 2 + 33 + 2 ("what ?") + 3 = 40 -> sample 0 gets 9 pads
    prompts = [
        "<|im_start|>user\n<image>\nleft <image>\nright what is this?<|im_end|>\n<|im_start|>assistant\n",
        prompt("what?"),
    ]
    images = [[noise(42, 42, seed=3), noise(90, 60, seed=4)], [noise(40, 90, seed=5)]]
    batch = adapter.prepare(images, prompts)
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]  # [2, L]
    length = ids.shape[1]
    pad = [length - int(mask[b].sum()) for b in range(2)]
    assert length == 40 and pad == [9, 0]
    assert bool((ids[0, :9] == adapter.tokenizer.pad_token_id).all())
    first, second = batch.layouts[0]
    (only,) = batch.layouts[1]
    assert (first.num_tokens, second.num_tokens, only.num_tokens) == (10, 10, 33)
    assert first.positions.tolist() == list(range(9 + 2, 9 + 12))
    assert second.positions.tolist() == list(range(9 + 13, 9 + 23))  # one word ("left") between them
    assert only.positions.tolist() == list(range(2, 35))
    for b, lay in ((0, first), (0, second), (1, only)):
        assert bool((ids[b, lay.positions] == adapter.image_token_id).all())
    assert int((ids == adapter.image_token_id).sum()) == 10 + 10 + 33
    # multi-image views: the base grid over the padded square; 90x60 is pasted at y = (90-60)//2 = 15
    assert [v.name for v in first.views] == ["base"] and [v.name for v in second.views] == ["base"]
    assert first.views[0].region == (0.0, 0.0, 42.0, 42.0)
    assert second.views[0].region == pytest.approx((0.0, -15.0, 90.0, 75.0))
    assert second.views[0].token_index == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    assert adapter.image_newline_indices(batch, 0) == [[9], [9]]
    assert adapter.image_newline_indices(batch, 1) == [[12, 16, 20, 24, 28, 32]]  # 9 + r * (3 + 1) + 3
    assert [v.name for v in only.views] == ["base", "highres"] and only.views[1].rows == 6
    feats = features(adapter, batch)
    assert [f.shape[0] for f in feats] == [10, 10, 33]
    torch.testing.assert_close(feats[1][9], adapter.model.model.image_newline)
    with torch.no_grad():
        out = adapter.model(**batch.inputs)  # the model accepts the layout the adapter describes
    assert out.logits.shape[:2] == (2, length)


def test_batch_generation_equals_single(adapter: LlavaOnevisionAdapter) -> None:
    samples = [
        ([noise(90, 60, seed=6)], prompt("what color is the square?")),
        ([noise(40, 90, seed=7)], prompt("what?")),
    ]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": adapter.tokenizer.pad_token_id}

    def generate(batch_samples: list) -> list[list[int]]:
        batch = adapter.prepare([s[0] for s in batch_samples], [s[1] for s in batch_samples])
        with torch.no_grad():
            out = adapter.model.generate(**batch.inputs, **kwargs)  # [B, L + 3]
        return out[:, batch.input_ids.shape[1]:].tolist()

    together = generate(samples)
    alone = [generate([s])[0] for s in samples]
    assert all(len(t) == 3 for t in together)
    assert together == alone


def test_control_strings_in_the_question_are_plain_text(adapter: LlavaOnevisionAdapter) -> None:
    image = noise(90, 60, seed=8)
    question = "what <image> is <|im_start|> <video> it <|im_end|> ?"
    text = adapter.format_prompt(question, 1, template="chat")
    assert WORD_JOINER in text and text.replace(WORD_JOINER, "").count("<image>") == 2
    batch = adapter.prepare([[image]], [text])
    ids = batch.input_ids[0].tolist()
    tok = adapter.tokenizer
    assert ids.count(adapter.image_token_id) == 27  # one image's worth, not two
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # the template's own two
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
    assert ids.count(tok.convert_tokens_to_ids("<video>")) == 0


def test_processor_round_trip_keeps_the_onevision_settings(tiny_dir, tmp_path) -> None:
    processor = LlavaOnevisionAdapter.load_processor(str(tiny_dir("llava_onevision")))
    processor.save_pretrained(tmp_path)
    again = LlavaOnevisionAdapter.load_processor(str(tmp_path))
    for p in (processor, again):
        assert (p.num_image_tokens, p.vision_feature_select_strategy, p.vision_aspect_ratio) == (9, "full",
                                                                                                   "anyres_max_2")
        assert p.image_processor.image_grid_pinpoints == [[42, 42], [42, 84], [84, 42], [84, 84]]
        assert "<|im_start|>" in p.chat_template


def test_wrap_a_model_loaded_by_hand(tiny_dir) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    path = tiny_dir("llava_onevision")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    processor = LlavaOnevisionAdapter.load_processor(str(path))
    mllm = innersight.wrap(model, processor, name="by-hand")
    assert mllm.adapter.family == "llava_onevision" and isinstance(mllm.adapter, LlavaOnevisionAdapter)
    loaded = innersight.load(str(path), device="cpu")
    image = noise(64, 64, seed=9)
    a = mllm.answer(image, "what is it?", max_new_tokens=3)
    b = loaded.answer(image, "what is it?", max_new_tokens=3)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 3


def test_default_feature_strategy_is_refused(adapter: LlavaOnevisionAdapter) -> None:
    from types import SimpleNamespace

    fake = SimpleNamespace(config=SimpleNamespace(vision_feature_select_strategy="default"))
    with pytest.raises(UnsupportedModelError, match="SigLIP has no CLS"):
        LlavaOnevisionAdapter(fake, adapter.processor)
