"""The adapters' text and map facet on every family: the text-only module, how image tokens land
on the image grid (token_grid / token_grid_blocks), and whether a prompt prefix may be shared
(prefix_image_inputs). Each facet is checked against what the model itself computes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES
from innersight.adapters.base import TokenGrid, token_grid_view
from innersight.errors import MethodError

#: what each family's facet answers (the tiny InstructBLIP has 2 Q-Former cross-attention blocks)
TEXT_ONLY = {"llava": "model", "llava_next": "model", "instructblip": "causal_lm",
             "qwen2_vl": "model", "qwen2_5_vl": "model", "llava_onevision": "model", "internvl": "model",
             "smolvlm": "model"}
BLOCKS = {"llava": 0, "llava_next": 0, "instructblip": 2, "qwen2_vl": 0, "qwen2_5_vl": 0, "llava_onevision": 0, "internvl": 0,
          "smolvlm": 0}
#: SmolVLM: 1D positions and frames that do not read the prompt (its pixels are one row per sample)
SHARES_PREFIX = {"llava": True, "llava_next": True, "instructblip": False, "qwen2_vl": True, "qwen2_5_vl": True,
                 "llava_onevision": True, "internvl": True, "smolvlm": True}
#: rows of an image input per image where it is not one: InternVL's tiles, a 70x50 image on the tiny
#: (aspect 1.4: 1x1 and 2x2 both miss by 0.4, 3500 px > half of 2x2 tiles of 32 px -> 2x2 + thumbnail)
ROWS_PER_IMAGE = {"internvl": 5}
#: Gemma 3: the whole model runs without pixels; soft tokens are the cells of the t x t grid; no
#: prefix sharing (its prompts need token_type_ids, and sliding-window layers keep only the last
#: window of keys, so a suffix pass cannot see the prefix's whole row)
TEXT_ONLY["gemma3"], BLOCKS["gemma3"], SHARES_PREFIX["gemma3"] = "model", 0, False
#: Qwen3-VL: as Qwen2-VL (the whole model runs without pixels; merged tokens are grid cells; a
#: shared prefix continued with M-RoPE positions, DeepStack computed in the prefix pass)
TEXT_ONLY["qwen3_vl"], BLOCKS["qwen3_vl"], SHARES_PREFIX["qwen3_vl"] = "model", 0, True


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_every_family_has_an_expected_answer():
    assert set(TEXT_ONLY) == set(BLOCKS) == set(SHARES_PREFIX) == set(FAMILIES)


# ---------------------------------------------------------------------------------- text only
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_module_is_the_language_model_on_a_prompt_without_image(tiny_mllm, family):
    """The text-only module runs a prompt with no image token and its logits are the decoder stack
    plus lm_head on the same ids: nothing of the vision path takes part."""
    mllm = tiny_mllm(family)
    a = mllm.adapter
    module = a.text_only_module
    assert module is getattr(a, TEXT_ONLY[family])
    prompts = [a.format_prompt(q, 0) for q in ("what is a circle?", "name a colour")]
    enc = a.tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [2, L]
    assert not (ids == a.image_token_id).any()
    with torch.no_grad():
        logits = module(input_ids=ids, attention_mask=mask).logits[:, -1]  # [2, V]
        hidden = a.language_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [2, L, D]
        expected = a.lm_head(hidden[:, -1])  # [2, V]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- token grid
@pytest.mark.parametrize("family", FAMILIES)
def test_token_grid_blocks(tiny_mllm, family):
    assert tiny_mllm(family).adapter.token_grid_blocks == BLOCKS[family]


def _locate_after_forward(mllm, batch, block: int) -> list[TokenGrid]:
    with mllm.adapter.token_grid(block) as locate, torch.no_grad():
        mllm.model(**batch.inputs)
        return [locate(batch, b) for b in range(len(batch))]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_grid_places_each_image_token_on_the_first_images_grid(tiny_mllm, family):
    mllm = tiny_mllm(family)
    batch = mllm.prepare([_image(90, 60, 0), _image(50, 70, 1)], ["what is it?", "where is the red circle?"])
    with torch.no_grad():
        mllm.model(**batch.inputs)  # a first forward may install transformers' own (lasting) hooks
    before = _hooks(mllm.model)
    block = BLOCKS[family] - 1 if BLOCKS[family] else 0
    grids = _locate_after_forward(mllm, batch, block)
    assert _hooks(mllm.model) == before  # whatever was recorded, nothing stays behind
    for b, grid in enumerate(grids):
        layout = batch.layouts[b][0]
        assert grid.view in layout.views
        if grid.weights is None:
            # patch tokens: the finest token view, each cell one distinct image token
            assert grid.view == token_grid_view(layout) and grid.view.token_index is not None
            index = np.asarray(grid.view.token_index).ravel()
            assert len(set(index.tolist())) == index.size == grid.view.rows * grid.view.cols
            assert 0 <= index.min() and index.max() < layout.num_tokens
        else:
            # weights: one row per image token, one column per cell; attention rows without the
            # CLS column sum to at most one
            assert grid.weights.shape == (layout.num_tokens, grid.view.rows * grid.view.cols)
            sums = grid.weights.sum(dim=-1)  # [T_img]
            assert torch.all(grid.weights >= 0) and torch.all(sums > 0) and torch.all(sums <= 1 + 1e-6)
    # sample 1 located inside the batch == sample 1 located alone (the right image's weights)
    alone = mllm.prepare([_image(50, 70, 1)], ["where is the red circle?"])
    (single,) = _locate_after_forward(mllm, alone, block)
    assert single.view == grids[1].view
    if single.weights is None:
        assert grids[1].weights is None
    else:
        torch.testing.assert_close(grids[1].weights, single.weights, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(grids[0].weights, grids[1].weights)  # two images, two weightings


@pytest.mark.parametrize("family", FAMILIES)
def test_token_grid_block_out_of_range(tiny_mllm, family):
    """A block the adapter does not have is a clear error where the adapter reads blocks; where it
    reads none, the block is ignored."""
    mllm = tiny_mllm(family)
    a = mllm.adapter
    before = _hooks(mllm.model)
    bad = BLOCKS[family] + 3
    if BLOCKS[family]:
        with pytest.raises(MethodError, match="does not exist"), a.token_grid(bad):
            pass
    else:
        with a.token_grid(bad) as locate:
            batch = mllm.prepare([_image(40, 40, 2)], ["what?"])
            assert locate(batch, 0).weights is None
    assert _hooks(mllm.model) == before


def test_token_grid_weights_need_a_forward(tiny_mllm):
    mllm = tiny_mllm("instructblip")
    batch = mllm.prepare([_image(40, 40, 3)], ["what?"])
    with mllm.adapter.token_grid(0) as locate, pytest.raises(RuntimeError, match="did not run"):
        locate(batch, 0)


def test_grid_projection_follows_the_adapters_weights(tiny_mllm, monkeypatch):
    """look.maps projects through whatever the adapter says: weights that put each token on its
    own cell give exactly the scattered map, so the weighted path is no family's special case."""
    from innersight.look import maps as M

    mllm = tiny_mllm("llava")
    a = mllm.adapter
    batch = mllm.prepare([_image(60, 60, 4)], ["what?"])
    layout = batch.layouts[0][0]
    view = token_grid_view(layout)
    values = torch.rand(batch.input_ids.shape[1], generator=torch.Generator().manual_seed(0))  # [L]
    with M.grid_projection(a, 0) as project:
        scattered, scattered_view = project(values, batch, 0)
    index = torch.tensor(view.token_index).flatten()  # [rows * cols] token of each cell
    one_hot = torch.zeros(layout.num_tokens, view.rows * view.cols)  # [T_img, rows * cols]
    one_hot[index, torch.arange(index.numel())] = 1.0

    @contextlib.contextmanager
    def weighted(self, block=2):
        yield lambda batch, b: TokenGrid(view, one_hot)

    monkeypatch.setattr(type(a), "token_grid", weighted)
    with M.grid_projection(a, 0) as project:
        through_weights, weighted_view = project(values, batch, 0)
    assert scattered_view == weighted_view == view
    np.testing.assert_allclose(through_weights, scattered, rtol=1e-12)


# ---------------------------------------------------------------------------------- prefix sharing
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_image_inputs_decide_the_shared_prefix_path(tiny_mllm, family):
    """Families that name their image inputs get the shared-prefix capture, equal to the joint
    batch's; the others (and a family that names none) get None, the joint batch."""
    from innersight.look.maps import forward_capture, pair_capture

    mllm = tiny_mllm(family)
    a = mllm.adapter
    declared = a.prefix_image_inputs
    assert bool(declared) == SHARES_PREFIX[family]
    image = _image(70, 50, 5)
    batch = mllm.prepare([image, image], ["what is the digit?", "Write a general description of the image."])
    if not declared:
        assert pair_capture(mllm, batch, 1) is None
        return
    tokens = set(a.prefix_token_inputs)  # per-token inputs ([B, L]) the prefix pass slices like its ids
    for key in tokens & set(batch.inputs):
        assert batch.inputs[key].shape == batch.input_ids.shape
    extra = set(batch.inputs) - {"input_ids", "attention_mask"} - tokens
    assert extra and extra <= set(declared)  # every image input of the batch is declared
    first = a.sample_image_inputs(batch, 1)  # what the prefix pass feeds for the first sample
    assert set(first) == extra
    for key in extra:
        # one row per image (InternVL: per tile; Qwen: pixel_values holds the image's patch rows)
        rows = ROWS_PER_IMAGE.get(family, 1)
        if key == "pixel_values" and "image_grid_thw" in batch.inputs:
            rows = int(batch.inputs["image_grid_thw"][0].prod())
        assert batch.inputs[key].shape[0] == 2 * rows
        torch.testing.assert_close(first[key], batch.inputs[key][:rows])
    shared = pair_capture(mllm, batch, 1)  # [2, H, L]
    joint = forward_capture(mllm, batch, 1, stop_after=True)  # [2, H, L]
    assert shared is not None
    torch.testing.assert_close(shared, joint, rtol=1e-4, atol=1e-6)


def test_a_family_that_names_no_image_inputs_takes_the_joint_batch(tiny_mllm, monkeypatch):
    from innersight.look.maps import pair_capture

    mllm = tiny_mllm("llava")
    image = _image(70, 50, 6)
    batch = mllm.prepare([image, image], ["what is the digit?", "Write a general description of the image."])
    assert pair_capture(mllm, batch, 1) is not None
    monkeypatch.setattr(type(mllm.adapter), "prefix_image_inputs", property(lambda self: ()))
    assert pair_capture(mllm, batch, 1) is None
