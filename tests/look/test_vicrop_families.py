"""ViCrop on every family: two-stage InstructBLIP maps, Qwen maps, high-resolution tiling and the
official mode, each against a hand computation (eager attention, autograd, hand-stitched maps).

Tiny models (testing/tiny): InstructBLIP 32 px / 8 px patches (4x4 ViT grid + CLS), 4 queries,
2 LM layers; Qwen2-VL / Qwen2.5-VL 2 LM layers, merged 2x2 grids; LLaVA 56 px / 14 px (4x4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import innersight
from innersight.adapters.geometry import GridView
from innersight.attention import IMPLEMENTATION, text_attention
from innersight.errors import MethodError
from innersight.look import vicrop as V
from innersight.look.boxes import round_box, select_box
from innersight.look.maps import answer_confidence
from innersight.look.tiling import tile_grid
from innersight.look.vicrop import ViCropConfig, choose_crops, importance_maps

QUERIES = 4  # num_query_tokens of the tiny InstructBLIP
SHARPEN = 8.0  # scale of the tiny random query/key weights, so that attention is far from uniform


def _scene(w: int = 60, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _sharpen(model: torch.nn.Module, adapter_layers, qformer_layers) -> None:
    """Scale query/key projections: random tiny weights otherwise give near-uniform attention."""
    with torch.no_grad():
        for layer in qformer_layers:
            if layer.has_cross_attention:
                att = layer.crossattention.attention
                att.query.weight.mul_(SHARPEN)
                att.key.weight.mul_(SHARPEN)
        for layer in adapter_layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN / 2)
            layer.self_attn.k_proj.weight.mul_(SHARPEN / 2)


# ---------------------------------------------------------------------------------- InstructBLIP
@pytest.fixture(scope="module")
def blip(tiny_dir):
    """A private tiny InstructBLIP (weights sharpened) and an eager copy of the same weights."""
    from transformers import AutoModelForImageTextToText

    path = str(tiny_dir("instructblip"))
    mllm = innersight.load(path, device="cpu")
    a = mllm.adapter
    _sharpen(mllm.model, a.decoder_layers, a.qformer.encoder.layer)
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    _sharpen(eager, eager.language_model.model.layers, eager.qformer.encoder.layer)
    return mllm, eager


def _blip_eager(mllm, eager, image, question, *, grad: bool = False):
    """One eager forward with every LM attention returned, and the Q-Former's cross-attentions
    from ``get_image_features`` (the full forward does not return them): (batch, outputs, cross)."""
    batch = mllm.prepare([image], [question])
    with torch.set_grad_enabled(grad):
        out = eager(**batch.inputs, output_attentions=True, use_cache=False)
    with torch.no_grad():
        feats = eager.get_image_features(
            batch.inputs["pixel_values"], qformer_input_ids=batch.inputs["qformer_input_ids"],
            qformer_attention_mask=batch.inputs["qformer_attention_mask"], output_attentions=True,
        )
    return batch, out, feats.qformer_outputs.cross_attentions


def _blip_two_stage(lm_row: torch.Tensor, cross: torch.Tensor, block: int) -> np.ndarray:
    """(1 x Q) LM values at the query positions times (Q x P) cross-attention -> 4x4 grid."""
    q_by_p = cross[block][0].mean(dim=0)[:, 1:]  # [Q, P] heads averaged, CLS column dropped
    assert q_by_p.shape == (QUERIES, 16)
    return (lm_row[:QUERIES].double() @ q_by_p.double()).reshape(4, 4).detach().numpy()


def test_instructblip_rel_att_is_lm_attention_times_qformer_cross_attention(blip):
    mllm, eager = blip
    image, question = _scene(60, 40, 1), "what is the color of the cat?"
    config = ViCropConfig(variant="rel-att", layer=1, qformer_block=1)
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    assert view.name == "vit_patches" and imap.shape == (4, 4)
    expected = {}
    for name, q in (("question", question), ("generic", config.generic_instruction)):
        batch, out, cross = _blip_eager(mllm, eager, image, q)
        assert batch.layouts[0][0].positions.tolist() == list(range(QUERIES))  # queries open the sequence
        lm = out.language_model_outputs.attentions[1][0, :, -1, :].mean(dim=0)  # [L] last row, head mean
        expected[name] = _blip_two_stage(lm, cross, block=1)
    np.testing.assert_allclose(raw["question"], expected["question"], rtol=1e-4)
    np.testing.assert_allclose(raw["generic"], expected["generic"], rtol=1e-4)
    np.testing.assert_allclose(imap, expected["question"] / (expected["generic"] + 1e-6), rtol=1e-4)
    # the blocks differ, so the check above really reads block 1 (not block 0)
    batch, out, cross = _blip_eager(mllm, eager, image, question)
    lm = out.language_model_outputs.attentions[1][0, :, -1, :].mean(dim=0)
    assert not np.allclose(_blip_two_stage(lm, cross, block=0), expected["question"],
                           rtol=1e-3)


def test_instructblip_recorded_cross_attention_equals_get_image_features(blip):
    mllm, eager = blip
    batch = mllm.prepare([_scene(seed=2), _scene(30, 50, 3)], ["what?", "is there a dog?"])
    with mllm.adapter.record_query_patch_attention(0) as records, torch.no_grad():
        mllm.model(**batch.inputs)
        feats = eager.get_image_features(
            batch.inputs["pixel_values"], qformer_input_ids=batch.inputs["qformer_input_ids"],
            qformer_attention_mask=batch.inputs["qformer_attention_mask"], output_attentions=True,
        )
    (recorded,) = records  # the eager model has no hook: one record, from mllm.model
    expected = feats.qformer_outputs.cross_attentions[0].mean(dim=1)[:, :, 1:]  # [2, Q, P]
    torch.testing.assert_close(recorded, expected, rtol=1e-4, atol=1e-7)
    assert not mllm.adapter.qformer_cross_attention_module(0)._forward_hooks  # removed on exit


def test_instructblip_grad_att_lm_stage_equals_autograd(blip):
    mllm, eager = blip
    image, question = _scene(48, 48, 4), "is there a star in the image?"
    config = ViCropConfig(variant="grad-att", layer=0, qformer_block=1)
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    batch, out, cross = _blip_eager(mllm, eager, image, question, grad=True)
    attn = out.language_model_outputs.attentions[0]  # [1, H, L, L] in the graph
    value = torch.log_softmax(out.logits[0, -1].float(), -1).max()
    (grad,) = torch.autograd.grad(value, [attn])
    weighted = (attn[0, :, -1, :] * torch.relu(grad[0, :, -1, :])).mean(dim=0).detach()  # [L]
    expected = _blip_two_stage(weighted, cross, block=1)
    assert expected.max() > 0  # not vacuous
    np.testing.assert_allclose(imap, expected, rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(raw["grad-att"], expected, rtol=1e-3, atol=1e-12)


def test_instructblip_pure_grad_gradients_equal_autograd(blip):
    mllm, _ = blip
    image, question = _scene(50, 30, 5), "what is the color of the square?"
    config = ViCropConfig(variant="pure-grad")
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    assert view.name == "vit_patches" and imap.shape == (4, 4)
    for name, q in (("grad_question", question), ("grad_generic", config.generic_instruction)):
        batch = mllm.prepare([image], [q])
        pv = batch.inputs["pixel_values"].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = mllm.model(**{**batch.inputs, "pixel_values": pv}).logits
            (g,) = torch.autograd.grad(torch.log_softmax(logits[0, -1].float(), -1).max(), [pv])
        norm = g[0].norm(dim=0).numpy()  # [32, 32]
        np.testing.assert_allclose(raw[name], norm.reshape(4, 8, 4, 8).mean(axis=(1, 3)), rtol=1e-3, atol=1e-12)
    assert np.all(np.isfinite(imap)) and np.all(imap >= 0)


def test_instructblip_block_out_of_range_is_a_clear_error(blip):
    mllm, _ = blip  # 2 Q-Former layers with cross-attention: blocks 0 and 1 only
    with pytest.raises(MethodError, match=r"block 2 does not exist.*2 cross-attention block.*qformer_block=1"):
        importance_maps(mllm, [_scene()], ["what?"], ViCropConfig())
    assert not any(m._forward_hooks for m in mllm.adapter.qformer.modules())


def test_instructblip_hooks_removed_after_an_exception(blip, monkeypatch):
    from innersight.look import maps as M

    mllm, _ = blip
    before = _hooks(mllm.model)

    def boom(logits):
        raise RuntimeError("boom")

    monkeypatch.setattr(M, "answer_confidence", boom)  # raises after the forward, inside every context
    with pytest.raises(RuntimeError, match="boom"):
        importance_maps(mllm, [_scene()], ["what?"], ViCropConfig(variant="grad-att", qformer_block=0))
    assert _hooks(mllm.model) == before
    assert text_attention(mllm.model) == "sdpa"
    assert all(p.grad is None for p in mllm.model.parameters())


def test_instructblip_default_block_is_the_third_cross_attention(tiny_mllm):
    # 5 Q-Former layers, cross-attention every 2nd: layers 0, 2, 4 -> block 2 is layer 4 (as in the
    # released checkpoints, 12 layers, frequency 2)
    mllm = tiny_mllm("instructblip", qformer_layers=5, cross_attention_frequency=2)
    a = mllm.adapter
    assert a.qformer_cross_attention_layers == (0, 2, 4)
    assert a.qformer_cross_attention_module(ViCropConfig().qformer_block) is a.qformer.encoder.layer[4].crossattention.attention
    assert a.qformer_cross_attention_module(-1) is a.qformer.encoder.layer[4].crossattention.attention


# ---------------------------------------------------------------------------------- Qwen
def _eager_text(mllm, image, question, *, grad: bool = False):
    batch = mllm.prepare([image], [question])
    model = mllm.model
    previous = text_attention(model)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.set_grad_enabled(grad):
            out = model(**batch.inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation({"text_config": previous})
    return batch, out


def _token_grid(values: torch.Tensor, layout, view) -> np.ndarray:
    return np.array([[float(values[layout.positions[i]]) for i in row] for row in view.token_index])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_rel_att_equals_hand_computation(tiny_mllm, family):
    mllm = tiny_mllm(family)
    image, question = _scene(90, 60, 6), "what is the digit in the red circle?"
    config = ViCropConfig(variant="rel-att", layer=1)
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    expected = {}
    for name, q in (("question", question), ("generic", config.generic_instruction)):
        batch, out = _eager_text(mllm, image, q)
        layout = batch.layouts[0][0]
        row = out.attentions[1][0, :, -1, :].mean(dim=0)  # [L]
        expected[name] = _token_grid(row, layout, layout.views[0])
        assert layout.views[0].name == "merged"
    t, h, w = (int(v) for v in batch.inputs["image_grid_thw"][0])
    assert imap.shape == (h // 2, w // 2) == (view.rows, view.cols)
    assert view.region == (0.0, 0.0, 90.0, 60.0)  # smart_resize stretches the whole image
    np.testing.assert_allclose(raw["question"], expected["question"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(raw["generic"], expected["generic"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(imap, expected["question"] / (expected["generic"] + 1e-6), rtol=1e-4)


def test_qwen_grad_att_equals_autograd_through_eager_attention(tiny_mllm):
    mllm = tiny_mllm("qwen2_5_vl")
    image, question = _scene(84, 56, 7), "is there a cat in the image?"
    (imap, view, _), = importance_maps(mllm, [image], [question], ViCropConfig(variant="grad-att", layer=0))
    batch, out = _eager_text(mllm, image, question, grad=True)
    attn = out.attentions[0]  # [1, H, L, L]
    (grad,) = torch.autograd.grad(answer_confidence(out.logits)[0], [attn])
    weighted = (attn[0, :, -1, :] * torch.relu(grad[0, :, -1, :])).mean(dim=0).detach()
    layout = batch.layouts[0][0]
    expected = _token_grid(weighted, layout, layout.views[0])
    assert expected.max() > 0
    np.testing.assert_allclose(imap, expected, rtol=1e-3, atol=1e-12)


def test_qwen_pure_grad_equals_autograd_and_base_size_is_224(tiny_mllm):
    mllm = tiny_mllm("qwen2_vl")
    assert mllm.adapter.crop_base_size == 224 == ViCropConfig().resolve_base_size(mllm.adapter)
    image, question = _scene(90, 60, 8), "what color?"
    config = ViCropConfig(variant="pure-grad")
    (imap, view, raw), = importance_maps(mllm, [image], [question], config)
    assert imap.shape == (view.rows, view.cols) and np.all(np.isfinite(imap)) and np.all(imap >= 0)
    for name, q in (("grad_question", question), ("grad_generic", config.generic_instruction)):
        batch = mllm.prepare([image], [q])
        pv = batch.inputs["pixel_values"].clone().requires_grad_(True)  # [P, 3 * 2 * 14 * 14]
        with torch.enable_grad():
            logits = mllm.model(**{**batch.inputs, "pixel_values": pv}).logits
            (g,) = torch.autograd.grad(answer_confidence(logits)[0], [pv])
        # Qwen2-VL's processor emits 2x2 merge blocks in row-major block order, 4 patches each;
        # a still image fills both temporal frames: the pixel gradient is their mean
        norms = g.reshape(-1, 3, 2, 14, 14).mean(dim=2).norm(dim=1)  # [P, 14, 14]
        expected = norms.reshape(view.rows, view.cols, -1).mean(dim=-1).numpy()  # [rows, cols]
        np.testing.assert_allclose(raw[name], expected, rtol=1e-3, atol=1e-12)
    assert not np.allclose(raw["grad_question"], raw["grad_generic"])


# ---------------------------------------------------------------------------------- high resolution
def _three_tiles() -> Image.Image:
    """192x64: with tile_max_side 64 a 1x3 grid of 64x64 tiles; the middle tile is red."""
    arr = np.full((64, 192, 3), 90, dtype=np.uint8)
    arr[:, 64:128] = (220, 10, 10)
    return Image.fromarray(arr)


def _planted(calls: list[int]):
    """A stand-in for single_image_maps: a flat 4x4 map per tile, with a peak at cell (1, 2) of red tiles."""

    def fake(mllm, images, questions, config, template="chat"):
        calls.append(len(images))
        out = []
        for image in images:
            m = np.ones((4, 4))
            r, g, _ = np.asarray(image, dtype=float).reshape(-1, 3).mean(axis=0)
            if r > 2 * g:
                m[1, 2] = 50.0
            view = GridView("fake", 4, 4, (0.0, 0.0, float(image.size[0]), float(image.size[1])), None)
            out.append((m, view, {"question": m * 2.0}))
        return out

    return fake


def test_high_res_box_lies_where_the_planted_tile_map_peaks(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")  # base size 56
    calls: list[int] = []
    monkeypatch.setattr(V, "single_image_maps", _planted(calls))
    image = _three_tiles()
    config = ViCropConfig(tile_max_side=64, max_batch=4)  # rel-att: 2 rows per tile -> 2 tiles per forward
    (res,) = choose_crops(mllm, [image], ["what is red?"], config)
    assert calls == [2, 1]
    assert res.tiles is not None and (res.tiles.rows, res.tiles.cols) == (1, 3)
    hand = np.ones((4, 12))
    hand[1, 4 + 2] = 50.0  # middle tile, cell (1, 2)
    np.testing.assert_array_equal(res.map, hand)
    np.testing.assert_array_equal(res.maps["question"], hand * 2.0)
    assert res.map_region == (0.0, 0.0, 192.0, 64.0)
    expected = select_box(hand, (192, 64), base_size=56, map_region=(0.0, 0.0, 192.0, 64.0))
    assert res.box == pytest.approx(expected.box)
    # the peak cell (x 96..112, y 16..32 in pixels) lies in the box, whose centre is in the red tile
    x0, y0, x1, y1 = res.box
    assert x0 <= 96 and 112 <= x1 and y0 <= 16 and 32 <= y1
    assert 64 <= (x0 + x1) / 2 < 128


def test_high_res_tiles_of_several_samples_are_batched_together(tiny_mllm, monkeypatch):
    mllm = tiny_mllm("llava")
    calls: list[int] = []
    monkeypatch.setattr(V, "single_image_maps", _planted(calls))
    small = _scene(50, 40, 9)  # fits one tile: mapped whole
    config = ViCropConfig(tile_max_side=64, max_batch=16)
    results = choose_crops(mllm, [_three_tiles(), small, _three_tiles()], ["a?", "b?", "c?"], config)
    assert calls == [7]  # 3 + 1 + 3 images in one forward of 14 rows
    assert [r.map.shape for r in results] == [(4, 12), (4, 4), (4, 12)]
    assert results[1].tiles is None
    grad_calls: list[int] = []
    monkeypatch.setattr(V, "single_image_maps", _planted(grad_calls))
    choose_crops(mllm, [_three_tiles()] * 2, ["a?", "b?"], ViCropConfig(variant="grad-att", tile_max_side=64, max_batch=4))
    assert grad_calls == [4, 2]  # grad-att: one row per tile


def test_high_res_stitched_map_equals_each_tile_mapped_alone(tiny_mllm):
    mllm = tiny_mllm("llava")
    rng = np.random.default_rng(10)
    image = Image.fromarray(rng.integers(0, 255, (64, 192, 3), dtype=np.uint8))
    config = ViCropConfig(layer=1, tile_max_side=64)
    (imap, view, raw), = importance_maps(mllm, [image], ["what is the digit?"], config)
    grid = tile_grid(192, 64, 64)
    assert (grid.rows, grid.cols) == (1, 3)
    assert imap.shape == (4, 12) and (view.rows, view.cols) == (4, 12)
    assert view.region == grid.map_region == (0.0, 0.0, 192.0, 64.0)
    for col in range(3):
        tile = image.crop((64 * col, 0, 64 * (col + 1), 64))
        (alone, _, alone_raw), = V.single_image_maps(mllm, [tile], ["what is the digit?"], config)
        np.testing.assert_allclose(imap[:, 4 * col:4 * (col + 1)], alone, rtol=1e-4)
        np.testing.assert_allclose(raw["generic"][:, 4 * col:4 * (col + 1)], alone_raw["generic"], rtol=1e-4)
    answer = mllm.answer(image, "what is the digit?", methods=["vicrop-rel-att"],
                         settings={"vicrop": {"tile_max_side": "64", "layer": "1"}}, max_new_tokens=2)
    assert answer.details["vicrop-rel-att"]["tiles"] == [1, 3]
    assert answer.maps["importance"].shape == (4, 12)


# ---------------------------------------------------------------------------------- official mode
def test_official_mode_stretches_the_map_and_drops_the_epsilon(tiny_mllm, monkeypatch):
    """llava-hf centre-crops 300x200 to its central 200x200 (x 50..250): a peak in the left column
    lands at x 50..100 by default, at x 0..75 when the map is stretched over the image."""
    mllm = tiny_mllm("llava")
    image = _scene(300, 200, 11)
    view = mllm.prepare([image], ["what?"]).layouts[0][0].views[0]
    assert view.region == pytest.approx((50.0, 0.0, 250.0, 200.0))
    planted = np.zeros((4, 4))
    planted[1, 0] = 1.0
    monkeypatch.setattr(V, "single_image_maps", lambda *a, **k: [(planted, view, {})])
    (default,) = choose_crops(mllm, [image], ["what?"], ViCropConfig())
    (official,) = choose_crops(mllm, [image], ["what?"], ViCropConfig(official=True))
    # ratio 1 (window 56 px = 1 cell) is the sharpest; centre = cell centre, half side 28
    assert default.box == pytest.approx((75 - 28, 75 - 28, 75 + 28, 75 + 28))  # cell 50 px wide from x = 50
    assert official.box == pytest.approx((37.5 - 28, 75 - 28, 37.5 + 28, 75 + 28))  # cell 75 px wide from x = 0
    assert default.map_region == pytest.approx((50.0, 0.0, 250.0, 200.0))
    assert official.map_region == (0.0, 0.0, 300.0, 200.0)


def test_official_mode_divides_without_epsilon(tiny_mllm, monkeypatch):
    from innersight.look import maps as M

    mllm = tiny_mllm("llava")
    question_map = np.full((4, 4), 2e-6)
    generic_map = np.full((4, 4), 1e-6)
    view = GridView("base", 4, 4, (0.0, 0.0, 56.0, 56.0), None)

    def planted(mllm, batch, layer, qformer_block=2, **kwargs):
        n = len(batch) // 2
        return [(question_map, view)] * n + [(generic_map, view)] * n

    monkeypatch.setattr(M, "attention_maps", planted)
    (default, _, _), = importance_maps(mllm, [_scene()], ["what?"], ViCropConfig())
    (official, _, _), = importance_maps(mllm, [_scene()], ["what?"], ViCropConfig(official=True))
    np.testing.assert_allclose(default, np.full((4, 4), 2e-6 / 2e-6))  # 2e-6 / (1e-6 + 1e-6)
    np.testing.assert_allclose(official, np.full((4, 4), 2.0))  # 2e-6 / 1e-6


# ---------------------------------------------------------------------------------- all families
FAMILIES = [
    ("llava", {}, {}),
    ("llava_next", {}, {}),
    # block 2 (the default) exists: Q-Former layers 0, 2, 4 have cross-attention
    ("instructblip", {"qformer_layers": 5, "cross_attention_frequency": 2}, {}),
    ("qwen2_vl", {}, {}),
    ("qwen2_5_vl", {}, {}),
    ("qwen3_vl", {}, {}),
    ("llava_onevision", {}, {}),
    ("internvl", {}, {}),
    ("smolvlm", {}, {}),
]


def _hooks(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Ids of every module's forward hooks and pre-hooks, by module name."""
    return {name: tuple(m._forward_hooks) + tuple(m._forward_pre_hooks) for name, m in model.named_modules()}


@pytest.mark.parametrize(("family", "build", "settings"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_end_to_end_batch_equals_unbatched_and_model_restored(tiny_mllm, family, build, settings):
    mllm = tiny_mllm(family, **build)
    images = [_scene(90, 60, 12), _scene(50, 70, 13)]
    questions = ["what is the digit in the red circle?", "is there a star?"]
    probe = mllm.prepare([images[0]], [questions[0]])
    attention_before = text_attention(mllm.model)
    with torch.no_grad():
        before = mllm.model(**probe.inputs).logits
    # transformers installs its own output-capturing hooks at the first forward and keeps them
    hooks_before = _hooks(mllm.model)
    batched = mllm.answer_batch(images, questions, methods=["vicrop-rel-att"], settings=settings, max_new_tokens=3)
    single = [mllm.answer(i, q, methods=["vicrop-rel-att"], settings=settings, max_new_tokens=3)
              for i, q in zip(images, questions)]
    for a, b, image in zip(batched, single, images):
        assert a.methods == ("vicrop-rel-att",)
        assert a.box == pytest.approx(b.box, abs=1e-3)
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.maps["importance"], b.maps["importance"], rtol=1e-3)
        x0, y0, x1, y1 = a.box
        assert 0 <= x0 < x1 <= image.size[0] and 0 <= y0 < y1 <= image.size[1]
        left, top, right, bottom = round_box(a.box, image.size)
        assert a.crop.size == (right - left, bottom - top)
    # the model is as it was: attention implementation, no handlers, no hooks, same logits
    assert text_attention(mllm.model) == attention_before != IMPLEMENTATION
    assert not any(hasattr(layer.self_attn, "_innersight_attention_handler") for layer in mllm.adapter.decoder_layers)
    assert _hooks(mllm.model) == hooks_before
    assert all(p.grad is None for p in mllm.model.parameters())
    with torch.no_grad():
        after = mllm.model(**probe.inputs).logits
    assert torch.equal(before, after)


def test_config_validation():
    with pytest.raises(MethodError, match="tile_max_side"):
        ViCropConfig(tile_max_side=0)
    with pytest.raises(MethodError, match="max_batch"):
        ViCropConfig(max_batch=0)
    assert ViCropConfig().qformer_block == 2 and ViCropConfig().tile_max_side is None
