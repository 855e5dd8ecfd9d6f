"""Contract tests of the InternVL 3 / 3.5 -hf adapter against a tiny random InternVLForConditionalGeneration.

The tiny model (testing/tiny/internvl.py): 32 px tiles, 8 px patches, so 4x4 patches per tile
and, after the 2x2 pixel shuffle, 2x2 = 4 language-model tokens per tile; ``crop_to_patches``
with 1 to 4 tiles. Candidate grids (cols, rows) in the processor's order: (1,1); (1,2), (2,1);
(1,3), (3,1); (1,4), (2,2), (4,1). Expected numbers below are worked out by hand from that rule
(closest aspect ratio; on a tie the larger grid while the image's area > half the grid's pixels),
not taken from the adapter.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import innersight
from innersight.adapters import adapter_class
from innersight.adapters.internvl import InternVLAdapter, optimal_tile_grid

# (W, H) -> (cols, rows, tiles incl. thumbnail, tokens):
# 32x32: aspect 1, (1,1) exact; (2,2) ties but 1024 px <= 0.5 * 4 * 1024 -> 1 tile, no thumbnail
# 40x40: the same tie, 1600 <= 2048 -> 1 tile
# 64x64: the same tie, 4096 > 2048 -> (2,2) + thumbnail = 5 tiles
# 90x60: aspect 1.5; (1,1), (2,1) and (2,2) all miss by 0.5; 5400 > 1024 and > 2048 -> (2,2), 5 tiles
# 100x30: aspect 3.33; (3,1) misses by 0.33, (4,1) by 0.67 -> 3 tiles + thumbnail
# 30x100: aspect 0.3; (1,3) misses by 0.033, (1,4) by 0.05 -> 3 tiles + thumbnail
# 50x80: aspect 0.625; (1,2) misses by 0.125, (1,3) by 0.29 -> 2 tiles + thumbnail
EXPECTED = {
    (32, 32): (1, 1, 1, 4), (40, 40): (1, 1, 1, 4), (64, 64): (2, 2, 5, 20), (90, 60): (2, 2, 5, 20),
    (100, 30): (3, 1, 4, 16), (30, 100): (1, 3, 4, 16), (50, 80): (1, 2, 3, 12),
}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def adapter(tiny_dir) -> InternVLAdapter:
    path = tiny_dir("internvl")
    processor = InternVLAdapter.load_processor(str(path))
    model = InternVLAdapter.model_class().from_pretrained(path).eval()
    return InternVLAdapter(model, processor)


def reference(adapter: InternVLAdapter, question: str, n: int = 1) -> str:
    return adapter.format_prompt(question, n, template="reference")


def test_registry_and_modules(adapter: InternVLAdapter) -> None:
    assert adapter_class("internvl") is InternVLAdapter
    assert adapter.model.config.model_type == "internvl"
    assert adapter.language_model is adapter.model.model.language_model
    assert len(adapter.decoder_layers) == 2 and adapter.final_norm is adapter.language_model.norm
    assert adapter.vision_tower is adapter.model.model.vision_tower
    assert adapter.vision_layers is adapter.vision_tower.encoder.layer and len(adapter.vision_layers) == 2
    assert adapter.projector is adapter.model.model.multi_modal_projector
    assert adapter.lm_head is adapter.model.lm_head
    assert adapter.vision_feature_layer == -1 and adapter.projector_vision_layers == (1,)
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (2, 4, 2, 8)
    assert adapter.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (adapter.tile_size, adapter.patch_grid, adapter.tile_token_grid, adapter.crop_base_size) == (
        (32, 32), (4, 4), (2, 2), 32)


def test_processor_loads_without_torchvision_and_saves_as_the_stock_class(adapter, tmp_path) -> None:
    from transformers import InternVLProcessor

    assert isinstance(adapter.processor, InternVLProcessor)
    assert adapter.processor.image_seq_length == 4
    assert not hasattr(adapter.processor, "video_processor") or adapter.processor.video_processor is None
    adapter.processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"


def test_hub_layout_rebuilds_and_the_processor_default_turns_tiling_on(tiny_dir, tmp_path) -> None:
    """The -hf checkpoints ship ``preprocessor_config.json`` (a GotOcr2 image processor with
    ``crop_to_patches: false``) and ``processor_config.json`` with ``image_seq_length`` only;
    ``InternVLProcessor``'s own default ``crop_to_patches=True`` wins, so images are still tiled."""
    src = tiny_dir("internvl")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, tmp_path / name)
    saved = json.loads((src / "processor_config.json").read_text())
    image = dict(saved["image_processor"], crop_to_patches=False, image_processor_type="GotOcr2ImageProcessorFast",
                 processor_class="InternVLProcessor")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_length": 4,
                                                                "processor_class": "InternVLProcessor"}))
    mllm = innersight.load(str(tmp_path), device="cpu")
    assert mllm.processor.image_processor.crop_to_patches is False
    assert mllm.adapter.tiling_settings()["crop_to_patches"] is True
    batch = mllm.prepare([noise(90, 60, seed=0)], ["what is it?"])
    assert batch.inputs["pixel_values"].shape[0] == 5  # the processor tiled: 2x2 + thumbnail
    assert batch.layouts[0][0].num_tokens == 20


def test_prompt_templates(adapter: InternVLAdapter) -> None:
    head, tail = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    assert reference(adapter, "what is it?", 2) == f"{head}<IMG_CONTEXT>\n<IMG_CONTEXT>\nwhat is it?{tail}"
    # the tiny chat template is the -hf checkpoints' format, so both agree here
    assert adapter.format_prompt("what is it?", 1, template="chat") == f"{head}<IMG_CONTEXT>\nwhat is it?{tail}"


def test_tile_grid_by_hand_and_against_transformers(adapter: InternVLAdapter) -> None:
    for size, (cols, rows, tiles, tokens) in EXPECTED.items():
        assert adapter.tile_grid(size) == (cols, rows), size
        assert adapter.num_tiles(size) == tiles and adapter.num_image_tokens(None, 0, size) == tokens, size
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for w in range(8, 200, 13):
        for h in range(8, 200, 17):
            for lo, hi in ((1, 4), (1, 12), (2, 6)):
                theirs = get_optimal_tiled_canvas((h, w), (32, 32), lo, hi)
                assert optimal_tile_grid(w, h, 32, 32, lo, hi) == tuple(theirs), (w, h, lo, hi)


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_token_count_matches_processor_and_model(adapter: InternVLAdapter, size: tuple[int, int]) -> None:
    cols, rows, tiles, tokens = EXPECTED[size]
    batch = adapter.prepare([[noise(*size, seed=1)]], [reference(adapter, "what is this?")])
    (layout,) = batch.layouts[0]
    assert batch.inputs["pixel_values"].shape == (tiles, 3, 32, 32)
    assert layout.num_tokens == tokens
    assert int((batch.input_ids == adapter.image_token_id).sum()) == tokens
    with torch.no_grad():
        feats = adapter.model.get_image_features(pixel_values=batch.inputs["pixel_values"]).pooler_output
    assert tuple(feats.shape[:2]) == (tiles, 4)  # [tiles, 2x2 tokens, D]
    # <img> and </img> frame the image's tokens
    ids = batch.input_ids[0]
    start, end = int(layout.positions[0]), int(layout.positions[-1])
    assert int(ids[start - 1]) == adapter.tokenizer.convert_tokens_to_ids("<img>")
    assert int(ids[end + 1]) == adapter.tokenizer.convert_tokens_to_ids("</img>")
    assert end - start + 1 == tokens


def test_views_by_hand(adapter: InternVLAdapter) -> None:
    # 100x30: 3x1 tiles of 4 tokens (indices 0-3, 4-7, 8-11), thumbnail last (12-15)
    base, stitched = adapter.views(None, 0, (100, 30))
    assert (base.name, base.rows, base.cols, base.region) == ("base", 2, 2, (0.0, 0.0, 100.0, 30.0))
    assert base.token_index == ((12, 13), (14, 15))
    assert (stitched.name, stitched.rows, stitched.cols, stitched.region) == ("tiles", 2, 6, (0.0, 0.0, 100.0, 30.0))
    assert stitched.token_index == ((0, 1, 4, 5, 8, 9), (2, 3, 6, 7, 10, 11))
    # cell (1, 4): third tile (x from 200/3 to 100), its bottom-left token; one cell is 100/6 x 15
    assert stitched.cell_box(1, 4) == pytest.approx((400 / 6, 15.0, 500 / 6, 30.0))
    # 30x100: 1x3 tiles stacked; cell (5, 1) is the bottom tile's bottom-right token (8 + 3)
    _, tall = adapter.views(None, 0, (30, 100))
    assert (tall.rows, tall.cols) == (6, 2)
    assert tall.token_index == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11))
    assert tall.cell_box(5, 1) == pytest.approx((15.0, 500 / 6, 30.0, 100.0))
    # 90x60: 2x2 tiles; row 1 of the stitched 4x4 grid is the top tiles' bottom rows
    _, grid = adapter.views(None, 0, (90, 60))
    assert grid.token_index[1] == (2, 3, 6, 7) and grid.token_index[2] == (8, 9, 12, 13)
    assert grid.cell_box(2, 1) == pytest.approx((22.5, 30.0, 45.0, 45.0))
    # a one-tile image has one view, the tile itself, over the whole (stretched) image
    (only,) = adapter.views(None, 0, (40, 40))
    assert (only.rows, only.cols, only.region, only.token_index) == (2, 2, (0.0, 0.0, 40.0, 40.0), ((0, 1), (2, 3)))


def _normalised(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The image stretched to ``width x height`` (bicubic), rescaled and CLIP-normalised: [3, H, W]."""
    array = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float64) / 255.0
    return ((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def test_tiles_are_the_boxes_the_views_claim(adapter: InternVLAdapter) -> None:
    """Each tile's pixels are the original image's box that the stitched view puts under that
    tile's cells, resized to 32 px; the last tile is the whole image (the base view)."""
    image = noise(100, 30, seed=2)
    batch = adapter.prepare([[image]], [reference(adapter, "what?")])
    pixels = batch.inputs["pixel_values"].double().numpy()  # [4, 3, 32, 32]
    canvas = _normalised(image, 3 * 32, 32)  # the whole image stretched to 3x1 tiles
    for c in range(3):
        np.testing.assert_allclose(pixels[c], canvas[:, :, c * 32:(c + 1) * 32], atol=0.02)
    np.testing.assert_allclose(pixels[3], _normalised(image, 32, 32), atol=0.02)
    tensor, view = adapter.pixel_view(batch, batch.inputs["pixel_values"], 0)
    assert torch.equal(tensor, batch.inputs["pixel_values"][3]) and view is batch.layouts[0][0].views[0]


def test_each_token_carries_its_cell_feature(adapter: InternVLAdapter) -> None:
    """The LM token a view names for a cell is the projection of that cell's 2x2 patch block of
    the tile it lies in (pixel shuffle order: (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1))."""
    batch = adapter.prepare([[noise(90, 60, seed=3)]], [reference(adapter, "what?")])
    pixel_values = batch.inputs["pixel_values"]  # [5, 3, 32, 32]
    model = adapter.model
    with torch.no_grad():
        packed = model.get_image_features(pixel_values=pixel_values).pooler_output.flatten(0, 1)  # [20, D]
        patches = adapter.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # [5, 16, Dv]
        grid = patches.reshape(5, 4, 4, -1)  # [tile, patch row, patch col, Dv]
    base, stitched = batch.layouts[0][0].views

    def cell_feature(tile: int, i: int, j: int) -> torch.Tensor:
        block = [grid[tile, 2 * i, 2 * j], grid[tile, 2 * i, 2 * j + 1],
                 grid[tile, 2 * i + 1, 2 * j], grid[tile, 2 * i + 1, 2 * j + 1]]
        with torch.no_grad():
            return adapter.projector(torch.cat(block)[None])[0]

    for r in range(4):
        for c in range(4):
            tile = (r // 2) * 2 + c // 2  # tiles row-major over the 2x2 grid
            torch.testing.assert_close(packed[stitched.token_index[r][c]], cell_feature(tile, r % 2, c % 2))
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(packed[base.token_index[i][j]], cell_feature(4, i, j))


def test_control_strings_in_user_text_are_neutralised(adapter: InternVLAdapter) -> None:
    image = noise(40, 40, seed=4)
    plain = adapter.prepare([[image]], [reference(adapter, "what is here?")]).input_ids[0].tolist()
    for s in ("<IMG_CONTEXT>", "<img>", "</img>", "<video>", "<|im_start|>", "<|im_end|>"):
        assert s in adapter.control_strings
        ids = adapter.prepare([[image]], [reference(adapter, f"what is {s} here?")]).input_ids[0].tolist()
        for token in ("<IMG_CONTEXT>", "<img>", "</img>", "<video>", "<|im_start|>", "<|im_end|>"):
            tid = adapter.tokenizer.convert_tokens_to_ids(token)
            assert ids.count(tid) == plain.count(tid), (s, token)


def test_two_images_in_one_prompt_and_left_padded_batch(adapter: InternVLAdapter) -> None:
    # sample 0: <|im_start|> user <img> 20 </img> <img> 4 </img> what is it ? <|im_end|> <|im_start|> assistant
    #           = 2 + 22 + 6 + 4 + 3 = 37 tokens ("\n" is whitespace to the tiny tokenizer)
    # sample 1: <|im_start|> user <img> 16 </img> what ? <|im_end|> <|im_start|> assistant = 2 + 18 + 2 + 3 = 25
    prompts = [reference(adapter, "what is it?", 2), reference(adapter, "what?")]
    images = [[noise(90, 60, seed=5), noise(32, 32, seed=6)], [noise(30, 100, seed=7)]]
    batch = adapter.prepare(images, prompts)
    ids, mask = batch.input_ids, batch.inputs["attention_mask"]  # [2, L]
    assert ids.shape[1] == 37 and [37 - int(mask[b].sum()) for b in range(2)] == [0, 12]
    assert bool((ids[1, :12] == adapter.tokenizer.pad_token_id).all()) and int(mask[1, :12].sum()) == 0
    first, second = batch.layouts[0]
    (only,) = batch.layouts[1]
    assert (first.num_tokens, second.num_tokens, only.num_tokens) == (20, 4, 16)
    assert (first.size, second.size, only.size) == ((90, 60), (32, 32), (30, 100))
    assert first.positions.tolist() == list(range(3, 23))
    assert second.positions.tolist() == list(range(25, 29))  # </img> <img> between the images
    assert only.positions.tolist() == list(range(12 + 3, 12 + 3 + 16))
    assert batch.inputs["pixel_values"].shape[0] == 5 + 1 + 4  # tiles in batch order
    assert adapter.tile_offset(batch, 1) == 5 and adapter.tile_offset(batch, 2) == 6
    assert len(second.views) == 1 and only.views[1].rows == 6
    with torch.no_grad():
        out = adapter.model(**batch.inputs)  # the model accepts the layout the adapter describes
    assert out.logits.shape[:2] == (2, 37)


def test_batch_generation_equals_single(adapter: InternVLAdapter) -> None:
    samples = [([noise(90, 60, seed=8)], reference(adapter, "what color is the square?")),
               ([noise(30, 100, seed=9)], reference(adapter, "what?"))]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": adapter.tokenizer.pad_token_id}

    def generate(batch_samples: list) -> list[list[int]]:
        batch = adapter.prepare([s[0] for s in batch_samples], [s[1] for s in batch_samples])
        with torch.no_grad():
            out = adapter.model.generate(**batch.inputs, **kwargs)  # [B, L + 3]
        return out[:, batch.input_ids.shape[1]:].tolist()

    together = generate(samples)
    assert all(len(t) == 3 for t in together)
    assert together == [generate([s])[0] for s in samples]


def test_wrap_a_model_loaded_by_hand(tiny_dir) -> None:
    path = tiny_dir("internvl")
    model = InternVLAdapter.model_class().from_pretrained(path).eval()
    processor = InternVLAdapter.load_processor(str(path))
    mllm = innersight.wrap(model, processor)
    assert isinstance(mllm.adapter, InternVLAdapter)
    loaded = innersight.load(str(path), device="cpu")
    image = noise(64, 64, seed=10)
    assert mllm.answer(image, "what is it?", max_new_tokens=3).token_ids == loaded.answer(
        image, "what is it?", max_new_tokens=3).token_ids


def test_internvl35_qwen3_decoder(tiny_mllm) -> None:
    mllm = tiny_mllm("internvl", text_model="qwen3")
    assert mllm.model.config.text_config.model_type == "qwen3"
    assert type(mllm.adapter.language_model).__name__ == "Qwen3Model"
    images, questions = [noise(90, 60, seed=11), noise(50, 80, seed=12)], ["what is it?", "is there a dog?"]
    batch = mllm.prepare(images, questions)
    assert [lay[0].num_tokens for lay in batch.layouts] == [20, 12]
    batched = mllm.answer_batch(images, questions, max_new_tokens=3)
    assert [a.token_ids for a in batched] == [mllm.answer(i, q, max_new_tokens=3).token_ids
                                             for i, q in zip(images, questions)]


def test_a_cls_keeping_strategy_is_refused(adapter: InternVLAdapter) -> None:
    from innersight.errors import UnsupportedModelError

    adapter.model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(UnsupportedModelError, match="CLS"):
            InternVLAdapter(adapter.model, adapter.processor)
    finally:
        adapter.model.config.vision_feature_select_strategy = "default"


def test_vicrop_rel_att_map_lies_on_the_stitched_tiles(tiny_mllm) -> None:
    """ViCrop's rel-att map of a tiled image is drawn on the stitched tile grid (the finest), each
    cell the last position's head-mean attention, at layer 1, to the token the view names there;
    computed here with eager attention, by hand."""
    from innersight.look.vicrop import ViCropConfig, importance_maps

    mllm = tiny_mllm("internvl")
    image, question = noise(90, 60, seed=13), "what is the digit in the red circle?"
    # the joint batch; the shared-prefix path (look/prefix.py) slices pixel_values one row per
    # image and does not yet know tiles (notes/families/internvl.md)
    config = ViCropConfig(variant="rel-att", layer=1, shared_prefix=False)
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    assert (view.name, view.rows, view.cols, view.region) == ("tiles", 4, 4, (0.0, 0.0, 90.0, 60.0))
    model = mllm.model
    previous = model.config.get_text_config()._attn_implementation
    expected = {}
    model.set_attn_implementation({"text_config": "eager"})
    try:
        for name, q in (("question", question), ("generic", config.generic_instruction)):
            batch = mllm.prepare([image], [q])
            with torch.no_grad():
                out = model(**batch.inputs, output_attentions=True, use_cache=False)
            row = out.attentions[1][0, :, -1, :].mean(dim=0)  # [L]
            layout = batch.layouts[0][0]
            expected[name] = np.array([[float(row[layout.positions[i]]) for i in cells] for cells in view.token_index])
    finally:
        model.set_attn_implementation({"text_config": previous})
    np.testing.assert_allclose(raw["question"], expected["question"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(raw["generic"], expected["generic"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(imap, expected["question"] / (expected["generic"] + 1e-6), rtol=1e-4)


def test_vision_query_key_applies_the_qk_norms_of_internvit_6b(adapter: InternVLAdapter) -> None:
    """InternViT-6B (``use_qk_norm``) normalises queries and keys over the full width before the head
    split: the q/k the adapter reads, with the values and output projection added by hand, give
    back the attention module's own output (the tiny tower has no norms, so one is built here)."""
    import copy

    from transformers.models.internvl.modeling_internvl import InternVLVisionAttention

    config = copy.deepcopy(adapter.config.vision_config)
    config.use_qk_norm = True
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = InternVLVisionAttention(config).eval()
    with torch.no_grad():
        module.q_norm.weight.uniform_(0.5, 2.0)
        module.k_norm.weight.uniform_(0.5, 2.0)
    hidden = torch.randn(3, 17, config.hidden_size)  # [N, 1 + p*p, Dv]
    with torch.no_grad():
        q, k = adapter.vision_query_key(module, hidden, {})  # [N, H, L, d]
        plain_q = module.q_proj(hidden).view(3, 17, module.num_heads, -1).transpose(1, 2)
        v = module.v_proj(hidden).view(3, 17, module.num_heads, -1).transpose(1, 2)  # [N, H, L, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) * module.scale, dim=-1)  # [N, H, L, L]
        by_hand = module.projection_layer((probs @ v).transpose(1, 2).reshape(hidden.shape))
        out = module(hidden)[0]
    assert q.shape == (3, config.num_attention_heads, 17, config.hidden_size // config.num_attention_heads)
    assert not torch.allclose(q, plain_q)  # the norm took part
    torch.testing.assert_close(by_hand, out, atol=1e-5, rtol=1e-4)
