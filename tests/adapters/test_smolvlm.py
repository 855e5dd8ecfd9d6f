"""Contract tests of the SmolVLM adapter against a tiny random SmolVLMForConditionalGeneration.

The tiny model (testing/tiny/smolvlm.py): tiles of m = 48 px, 8 px patches (6 x 6 a tile),
scale factor 2, so g = 3 tokens a tile side and 9 tokens a frame; images are first resized to a
longest edge of 96 px. Expected numbers are worked out by hand from the processor's rules
(image_processing_pil_smolvlm.py: longest-edge resize with an even short side,
resize_for_vision_encoder to multiples of 48, split into 48 px tiles + one global frame), not
taken from the adapter:

* 100x30: resize -> w 96, h int(96 / (100/30)) = int(28.8) = 28 (even); canvas w 96,
  h ceil(int(96 / (96/28)) / 48) * 48 = 48 -> 1 x 2 tiles -> (2 + 1) * 9 = 27 tokens;
* 30x100: its transpose -> 2 x 1 tiles -> 27 tokens;
* 90x60: resize -> 96 x 64; canvas 96 x ceil(64/48)*48 = 96 -> 2 x 2 tiles -> 45 tokens;
* 40x40: resize -> 96 x 96 (upscaled) -> 2 x 2 tiles -> 45 tokens;
* 20x10: resize -> 96 x 48 -> 1 x 2 tiles -> 27 tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import innersight
from innersight.adapters import adapter_class
from innersight.adapters.smolvlm import SmolVLMAdapter, longest_edge_size, tile_canvas_size

EXPECTED = {  # (W, H): (rows, cols, tokens)
    (100, 30): (1, 2, 27),
    (30, 100): (2, 1, 27),
    (90, 60): (2, 2, 45),
    (40, 40): (2, 2, 45),
    (20, 10): (1, 2, 27),
}
FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def packed_features(adapter: SmolVLMAdapter, batch) -> torch.Tensor:
    """The model's image features of the whole batch, frames in order: [T_total, D]. transformers
    5.25 returns one [T_b, D] tensor per sample, 5.17 one [frames, g*g, D] tensor for all."""
    with torch.no_grad():
        out = adapter.model.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["pixel_attention_mask"]
        ).pooler_output
    parts = list(out) if isinstance(out, (list, tuple)) else [out]
    return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


def stripe(width: int, height: int, x0: int, x1: int) -> Image.Image:
    """Black image with a white vertical band over original columns ``x0 .. x1 - 1``."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, x0:x1] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def adapter(tiny_mllm) -> SmolVLMAdapter:
    return tiny_mllm("smolvlm").adapter


def prompt(adapter: SmolVLMAdapter, question: str, n: int = 1) -> str:
    return adapter.format_prompt(question, n, template="reference")


# ---------------------------------------------------------------------- modules and loading
def test_registry_and_modules(adapter: SmolVLMAdapter) -> None:
    inner = adapter.model.model
    assert adapter_class("smolvlm") is SmolVLMAdapter
    assert adapter.language_model is inner.text_model
    assert len(adapter.decoder_layers) == 2 and adapter.final_norm is inner.text_model.norm
    assert adapter.vision_tower is inner.vision_model and adapter.projector is inner.connector
    assert adapter.lm_head is adapter.model.lm_head
    assert len(adapter.vision_layers) == 2 and adapter.vision_layers is inner.vision_model.encoder.layers
    assert adapter.vision_feature_layer == -1 and adapter.projector_vision_layers == (1,)
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (2, 4, 2, 16)
    assert (adapter.tile_size, adapter.scale_factor, adapter.tokens_per_side) == (48, 2, 3)
    assert adapter.crop_base_size == 48
    assert adapter.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")


def test_processor_loads_offline_without_video_parts(adapter: SmolVLMAdapter, tiny_dir, tmp_path) -> None:
    import json

    from transformers import SmolVLMProcessor
    from transformers.utils import is_torchvision_available

    processor = SmolVLMAdapter.load_processor(str(tiny_dir("smolvlm")))
    assert isinstance(processor, SmolVLMProcessor) and processor.image_seq_len == 9
    if not is_torchvision_available():
        assert type(processor).__name__ == "SmolVLMImageTextProcessor"
        assert not hasattr(processor, "video_processor")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "SmolVLMProcessor" and saved["image_seq_len"] == 9
    assert SmolVLMAdapter.load_processor(str(tmp_path)).image_seq_len == 9


def test_prompt_templates(adapter: SmolVLMAdapter) -> None:
    assert adapter.format_prompt("what is it?", 2, template="reference") == (
        "<|im_start|>User:<image><image>what is it?<end_of_utterance>\nAssistant:"
    )
    # the tiny chat template is SmolVLM's own format: both agree
    assert adapter.format_prompt("what is it?", 1, template="chat") == (
        "<|im_start|>User:<image>what is it?<end_of_utterance>\nAssistant:"
    )


# ---------------------------------------------------------------------- token arithmetic
def test_resize_arithmetic_by_hand() -> None:
    assert longest_edge_size(100, 30, 96) == (96, 28)
    assert longest_edge_size(90, 60, 96) == (96, 64)
    assert longest_edge_size(99, 60, 96) == (96, 58)  # int(96 / 1.65) = 58, even
    assert longest_edge_size(60, 97, 96) == (60, 96)  # int(96 * 60/97) = int(59.38) = 59 -> 60
    assert longest_edge_size(20, 10, 96) == (96, 48)  # upscaled
    assert tile_canvas_size(96, 28, 48) == (96, 48)
    assert tile_canvas_size(96, 64, 48) == (96, 96)
    assert tile_canvas_size(28, 96, 48) == (48, 96)


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_token_count_matches_processor_and_model(adapter: SmolVLMAdapter, size: tuple[int, int]) -> None:
    rows, cols, tokens = EXPECTED[size]
    batch = adapter.prepare([[noise(*size, seed=1)]], [prompt(adapter, "what is this?")])
    (layout,) = batch.layouts[0]
    lay = adapter.split_layout(size)
    assert (lay.rows, lay.cols, lay.num_tokens) == (rows, cols, tokens)
    assert layout.num_tokens == tokens
    assert int((batch.input_ids == adapter.image_token_id).sum()) == tokens
    assert batch.inputs["pixel_values"].shape[:2] == (1, rows * cols + 1)  # tiles + the global frame
    row_tokens = [t for t in adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
                  if t.startswith("<row_")]
    assert row_tokens == [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)]
    assert packed_features(adapter, batch).shape[0] == tokens


def test_an_image_that_fits_one_tile_is_the_global_frame_only(tiny_mllm) -> None:
    """With the longest edge 48 (= one tile) no image is split: 9 tokens, wrapped by
    ``<fake_token_around_image><global-img> ... <fake_token_around_image>``."""
    adapter = tiny_mllm("smolvlm", longest_edge=48).adapter
    batch = adapter.prepare([[noise(90, 60, seed=2)]], [prompt(adapter, "what?")])
    (layout,) = batch.layouts[0]
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    assert tokens[:6] == ["<|im_start|>", "User", ":", FAKE, GLOBAL, "<image>"]
    assert layout.positions.tolist() == list(range(5, 14)) and tokens[14] == FAKE
    (base,) = layout.views
    assert (base.name, base.rows, base.cols, base.region) == ("base", 3, 3, (0.0, 0.0, 90.0, 60.0))
    assert base.token_index == ((0, 1, 2), (3, 4, 5), (6, 7, 8))


# ---------------------------------------------------------------------- views
def test_views_of_a_two_tile_image(adapter: SmolVLMAdapter) -> None:
    # 100x30: 1 x 2 tiles; tile 1 covers original x 0..50, tile 2 x 50..100, all of y; tokens
    # 0..8 tile 1, 9..17 tile 2, 18..26 the global view
    views = adapter.views(None, 0, (100, 30))
    assert [v.name for v in views] == ["base", "tiles", "tile_1_1", "tile_1_2"]
    base, tiles, t11, t12 = views
    assert (base.rows, base.cols, base.region) == (3, 3, (0.0, 0.0, 100.0, 30.0))
    assert base.token_index == ((18, 19, 20), (21, 22, 23), (24, 25, 26))
    assert (tiles.rows, tiles.cols, tiles.region) == (3, 6, (0.0, 0.0, 100.0, 30.0))
    assert tiles.token_index == ((0, 1, 2, 9, 10, 11), (3, 4, 5, 12, 13, 14), (6, 7, 8, 15, 16, 17))
    assert t11.region == (0.0, 0.0, 50.0, 30.0) and t12.region == (50.0, 0.0, 100.0, 30.0)
    assert t12.token_index == ((9, 10, 11), (12, 13, 14), (15, 16, 17))
    # a stitched cell is the same pixels as the tile cell holding the same token
    assert tiles.cell_box(1, 4) == pytest.approx(t12.cell_box(1, 1))
    assert tiles.cell_box(1, 4) == pytest.approx((50 + 50 / 3, 10.0, 50 + 100 / 3, 20.0))


def test_views_of_a_two_by_two_image(adapter: SmolVLMAdapter) -> None:
    views = adapter.views(None, 0, (90, 60))
    assert [v.name for v in views] == ["base", "tiles", "tile_1_1", "tile_1_2", "tile_2_1", "tile_2_2"]
    tiles, t21 = views[1], views[4]
    assert (tiles.rows, tiles.cols) == (6, 6)
    assert t21.region == (0.0, 30.0, 45.0, 60.0)
    assert t21.token_index[0] == (18, 19, 20)  # third tile in row-major order
    assert tiles.token_index[3][:4] == (18, 19, 20, 27)  # stitched row 3: tile 2_1, then tile 2_2
    assert views[0].token_index[0] == (36, 37, 38)  # global view after the 4 tiles


def test_cells_cover_the_pixels_the_processor_puts_there(adapter: SmolVLMAdapter) -> None:
    """A white band at original x 70..80 of a 100x30 image: tile 2 (x 50..100, 48 px) shows it at
    local px (70-50)*48/50 = 19.2 .. 28.8, i.e. its patch columns 2..3 = token column 1, whose cell
    the view puts at x 66.7 .. 83.3; the global frame (whole image, 48 px) shows it at
    33.6 .. 38.4 = token column 2 (x 66.7 .. 100)."""
    batch = adapter.prepare([[stripe(100, 30, 70, 80)]], [prompt(adapter, "what?")])
    pixels = batch.inputs["pixel_values"][0]  # [3 frames, 3, 48, 48]
    base, _, _, t12 = batch.layouts[0][0].views

    def bright_columns(frame: torch.Tensor) -> list[int]:
        column = frame.mean(dim=(0, 1))  # [48] in [-1, 1]
        return [int(i) for i in torch.nonzero(column > 0).flatten()]

    tile_cols = bright_columns(pixels[1])
    assert tile_cols and min(tile_cols) >= 16 and max(tile_cols) < 32  # token column 1
    x0, _, x1, _ = t12.cell_box(0, 1)
    assert x0 <= 70 and 80 <= x1
    assert bright_columns(pixels[0]) == []  # tile 1 (x 0..50) has no band
    global_cols = bright_columns(pixels[2])
    assert global_cols and min(global_cols) >= 32  # token column 2
    x0, _, x1, _ = base.cell_box(0, 2)
    assert x0 <= 70 and 80 <= x1


def test_token_order_is_the_pixel_shuffle_grid_row_major(adapter: SmolVLMAdapter) -> None:
    """Changing one vision patch (i, j) of a frame changes only the LM token (i // 2, j // 2) of
    that frame, in row-major order: the order the views' ``token_index`` assume."""
    connector = adapter.projector
    hidden = torch.randn(1, 36, connector.modality_projection.proj.in_features // 4)  # [1, 6*6, Dv]
    with torch.no_grad():
        before = connector(hidden)[0]  # [9, D]
        for i, j in [(0, 0), (1, 4), (4, 1), (5, 5), (2, 3)]:
            changed = hidden.clone()
            changed[0, i * 6 + j] += 1.0
            after = connector(changed)[0]
            moved = [t for t in range(9) if not torch.allclose(after[t], before[t])]
            assert moved == [(i // 2) * 3 + j // 2]


def test_features_sit_at_the_tokens_the_views_name(adapter: SmolVLMAdapter) -> None:
    """The model's image features for a 90x60 image: frame k's 9 tokens are features 9k .. 9k+8,
    tiles row-major then the global frame, as the views say."""
    batch = adapter.prepare([[noise(90, 60, seed=4)]], [prompt(adapter, "what?")])
    frames = batch.inputs["pixel_values"][0]  # [5, 3, 48, 48]
    packed = packed_features(adapter, batch)  # [45, D]
    with torch.no_grad():
        per_frame = adapter.projector(adapter.vision_tower(frames).last_hidden_state)  # [5, 9, D]
    views = batch.layouts[0][0].views
    names = {v.name: v for v in views}
    for k, name in enumerate(["tile_1_1", "tile_1_2", "tile_2_1", "tile_2_2", "base"]):
        view = names[name]
        for r in range(3):
            for c in range(3):
                torch.testing.assert_close(packed[view.token_index[r][c]], per_frame[k, r * 3 + c])
    stitched = names["tiles"]
    torch.testing.assert_close(packed[stitched.token_index[4][1]], per_frame[2, 1 * 3 + 1])  # tile 2_1, cell (1, 1)


def test_pixel_view_is_the_global_frame(adapter: SmolVLMAdapter) -> None:
    batch = adapter.prepare([[noise(100, 30, seed=5)], [noise(90, 60, seed=6)]], [prompt(adapter, "a?")] * 2)
    pixels = batch.inputs["pixel_values"]  # [2, 5, 3, 48, 48]
    frame, view = adapter.pixel_view(batch, pixels, 0)
    assert view.name == "base" and torch.equal(frame, pixels[0, 2])  # after 2 tiles
    frame, _ = adapter.pixel_view(batch, pixels, 1)
    assert torch.equal(frame, pixels[1, 4])  # after 4 tiles


def test_tiles_the_patches_do_not_fill(tiny_mllm) -> None:
    """52 px tiles with 8 px patches: 6 patches a side see 48 of 52 px; per-tile and global
    views cover only the seen part. 100x30 -> resize 104 x int(31.2) = 31 -> 32 (even); canvas
    104 x 52 -> 1 x 2 tiles, 27 tokens."""
    adapter = tiny_mllm("smolvlm", image_size=52).adapter
    lay = adapter.split_layout((100, 30))
    assert (lay.rows, lay.cols, lay.num_tokens) == (1, 2, 27)
    base, tiles, _, t12 = adapter.views(None, 0, (100, 30))
    seen = 48 / 52
    assert base.region == pytest.approx((0.0, 0.0, 100 * seen, 30 * seen))
    assert t12.region == pytest.approx((50.0, 0.0, 50 + 50 * seen, 30 * seen))
    assert tiles.region == (0.0, 0.0, 100.0, 30.0)
    batch = adapter.prepare([[noise(100, 30, seed=7)]], [prompt(adapter, "what?")])
    frame, _ = adapter.pixel_view(batch, batch.inputs["pixel_values"], 0)
    assert tuple(frame.shape) == (3, 48, 48)  # the seen part of the 52 px global frame
    assert batch.layouts[0][0].num_tokens == 27


# ---------------------------------------------------------------------- batches
def test_two_images_in_one_prompt_and_left_padded_batch(adapter: SmolVLMAdapter) -> None:
    # sample 0: <|im_start|> User : | 100x30 (1x2 tiles): [fake row 9 img] x2, fake global 9 img fake
    # = 34 tokens (3..36) | 40x40 (2x2): 4 x 11 + 12 = 56 tokens (37..92) | what is it ? <eou>
    # Assistant : (7) -> 100. sample 1: 3 + 30x100 (2x1: 34 tokens) + what ? <eou> Assistant : (5)
    # = 42 -> 58 pad tokens on the left. (The tiny tokenizer drops the "\n" between tile rows.)
    prompts = [prompt(adapter, "what is it?", 2), prompt(adapter, "what?")]
    images = [[noise(100, 30, seed=8), noise(40, 40, seed=9)], [noise(30, 100, seed=10)]]
    batch = adapter.prepare(images, prompts)
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]
    assert ids.shape[1] == 100 and int(mask[1].sum()) == 42
    assert bool((ids[1, :58] == adapter.tokenizer.pad_token_id).all()) and int(mask[1, :58].sum()) == 0
    first, second = batch.layouts[0]
    (only,) = batch.layouts[1]
    assert (first.num_tokens, second.num_tokens, only.num_tokens) == (27, 45, 27)
    assert first.positions.tolist() == [*range(5, 14), *range(16, 25), *range(27, 36)]
    assert second.positions.tolist() == [*range(39, 48), *range(50, 59), *range(61, 70), *range(72, 81),
                                         *range(83, 92)]
    assert only.positions.tolist() == [*range(63, 72), *range(74, 83), *range(85, 94)]
    tokens = adapter.tokenizer.convert_ids_to_tokens(ids[1].tolist())
    assert tokens[61:63] == [FAKE, "<row_1_col_1>"] and tokens[72:74] == [FAKE, "<row_2_col_1>"]
    assert tokens[83:85] == [FAKE, GLOBAL] and tokens[94] == FAKE
    assert [v.name for v in only.views][2:] == ["tile_1_1", "tile_2_1"]
    with torch.no_grad():
        out = adapter.model(**batch.inputs)  # the model accepts the layout the adapter describes
    assert out.logits.shape[:2] == (2, 100)


def test_batch_generation_equals_single(adapter: SmolVLMAdapter) -> None:
    samples = [([noise(100, 30, seed=11), noise(40, 40, seed=12)], prompt(adapter, "compare them", 2)),
               ([noise(30, 100, seed=13)], prompt(adapter, "what?"))]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": adapter.tokenizer.pad_token_id}

    def generate(batch_samples: list) -> list[list[int]]:
        batch = adapter.prepare([s[0] for s in batch_samples], [s[1] for s in batch_samples])
        with torch.no_grad():
            out = adapter.model.generate(**batch.inputs, **kwargs)  # [B, L + 3]
        return out[:, batch.input_ids.shape[1]:].tolist()

    together = generate(samples)
    assert all(len(t) == 3 for t in together)
    assert together == [generate([s])[0] for s in samples]


def test_control_strings_in_the_question_are_plain_text(adapter: SmolVLMAdapter) -> None:
    question = "is <image> a <row_1_col_1> or <global-img> <fake_token_around_image>?"
    text = adapter.format_prompt(question, 1, template="chat")
    batch = adapter.prepare([[noise(100, 30, seed=14)]], [text])
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch.input_ids[0].tolist())
    assert batch.layouts[0][0].num_tokens == 27 and tokens.count("<image>") == 27
    assert tokens.count("<row_1_col_1>") == 1 and tokens.count(GLOBAL) == 1 and tokens.count(FAKE) == 4


def test_wrap_of_a_hand_loaded_model(tiny_dir) -> None:
    path = str(tiny_dir("smolvlm"))
    from transformers import SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(path)
    wrapped = innersight.wrap(model, SmolVLMAdapter.load_processor(path))
    loaded = innersight.load(path, device="cpu")
    image = noise(90, 60, seed=15)
    a = wrapped.answer(image, "what is it?", max_new_tokens=3)
    assert a.token_ids and a.token_ids == loaded.answer(image, "what is it?", max_new_tokens=3).token_ids


def test_image_spans_cover_the_wrapped_tiles_and_image_free_prompts_drop_them(adapter: SmolVLMAdapter) -> None:
    """Spans (see the two-image batch above): sample 0's 100x30 image from its opening fake token
    at 3 to its closing fake token at 36, its 40x40 image 37 .. 92, sample 1's image 61 .. 94. The
    image-free prompt is the chat prompt of the question alone."""
    from innersight.decode.image_free import image_free_inputs

    prompts = [prompt(adapter, "what is it?", 2), prompt(adapter, "what?")]
    images = [[noise(100, 30, seed=8), noise(40, 40, seed=9)], [noise(30, 100, seed=10)]]
    batch = adapter.prepare(images, prompts)
    assert adapter.image_spans(batch, 0) == [(3, 37), (37, 93)]
    assert adapter.image_spans(batch, 1) == [(61, 95)]
    free = image_free_inputs(adapter, batch)
    for b, question in enumerate(["what is it?", "what?"]):
        alone = adapter.tokenizer(adapter.format_prompt(question, 0, template="chat"))["input_ids"]
        row = free.input_ids[b][free.attention_mask[b].bool()].tolist()
        assert row == alone  # "<|im_start|> User : what is it ? <end_of_utterance> Assistant :"
    # 8 tokens "<|im_start|> User : what ? <end_of_utterance> Assistant :", numbered from 0 after the padding
    assert free.position_ids[1][free.attention_mask[1].bool()].tolist() == list(range(8))


def test_shared_prefix_with_two_images_per_sample_equals_the_joint_batch(tiny_mllm) -> None:
    """Pixels are one row per sample (all its images' frames): the shared-prefix pass takes the
    first n rows (sample_image_inputs), not one row per image; its maps equal the joint batch's."""
    from innersight.look.maps import forward_capture, pair_capture

    mllm = tiny_mllm("smolvlm")
    images = [noise(90, 60, 0), noise(200, 40, 1)]  # 5 frames, then 3
    batch = mllm.prepare([images, images], ["what is the digit?", "Write a general description of the image."])
    assert batch.inputs["pixel_values"].shape[:2] == (2, 8)
    assert [v.shape[0] for v in mllm.adapter.sample_image_inputs(batch, 1).values()] == [1, 1]
    shared = pair_capture(mllm, batch, 1)  # [2, H, L]
    joint = forward_capture(mllm, batch, 1, stop_after=True)  # [2, H, L]
    assert shared is not None
    torch.testing.assert_close(shared, joint, rtol=1e-4, atol=1e-6)
