"""ViCrop's cost cuts keep the maps: the lm_head at the last position only (grad-att, pure-grad),
on every family, against the full-logits computation."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from innersight import generation_calls
from innersight.generation_calls import last_logits_kwargs
from innersight.look.vicrop import ViCropConfig, importance_maps

FAMILIES = ("llava", "llava_next", "instructblip", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "smolvlm")


def _scene(w: int = 90, h: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_last_logits_only_on_every_family(tiny_mllm, family):
    mllm = tiny_mllm(family)
    keep = last_logits_kwargs(mllm.model)
    assert keep == {"logits_to_keep": 1}, f"{family}: the lm_head would run on every prompt position"
    batch = mllm.prepare([_scene(), _scene(seed=1)], ["what is it?", "is there a red star here?"])
    with torch.inference_mode():
        full = mllm.model(**batch.inputs, use_cache=False).logits  # [B, L, V]
        last = mllm.model(**batch.inputs, use_cache=False, **keep).logits  # [B, 1, V]
    assert last.shape == (full.shape[0], 1, full.shape[2])
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "instructblip", "qwen2_vl"])
@pytest.mark.parametrize("variant", ["grad-att", "pure-grad"])
def test_gradient_maps_same_with_last_logits_only(tiny_mllm, monkeypatch, family, variant):
    mllm = tiny_mllm(family)
    images = [_scene(seed=2), _scene(120, 80, seed=3)]
    questions = ["what is the digit in the red circle?", "what colour is the star?"]
    config = ViCropConfig(variant=variant, layer=1, qformer_block=1)
    cut = importance_maps(mllm, images, questions, config)
    from innersight.look import maps, pure_grad

    for module in (maps, pure_grad):
        monkeypatch.setattr(module, "last_logits_kwargs", lambda model: {})
    full = importance_maps(mllm, images, questions, config)
    monkeypatch.undo()
    assert generation_calls.last_logits_kwargs(mllm.model)  # the cut path really was the cut one
    for (m_cut, _, raw_cut), (m_full, _, raw_full) in zip(cut, full):
        np.testing.assert_allclose(m_cut, m_full, rtol=1e-4, atol=1e-9)
        for key in raw_full:
            np.testing.assert_allclose(raw_cut[key], raw_full[key], rtol=1e-4, atol=1e-9)


def _layer0_tokens(mllm, run) -> tuple[int, object]:
    """(positions the first decoder layer processed, result of ``run()``)."""
    seen = []
    hook = mllm.adapter.decoder_layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int(kwargs.get("hidden_states", args[0] if args else None).shape[:2].numel())),
        with_kwargs=True)
    try:
        result = run()
    finally:
        hook.remove()
    return sum(seen), result


#: families whose rel-att pair capture shares the prefix (the adapter names its image inputs);
#: the Qwen families continue the prefix's cache with their M-RoPE positions (batch_positions)
SHARED_PREFIX_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_rel_att_shared_prefix_same_maps_less_work(tiny_mllm, family):
    mllm = tiny_mllm(family)
    images = [_scene(seed=4), _scene(120, 80, seed=5), _scene(70, 70, seed=6)]
    questions = ["what is the digit in the red circle?", "what colour is the star?\nAnswer briefly.", "is it?"]
    shared_tokens, shared = _layer0_tokens(
        mllm, lambda: importance_maps(mllm, images, questions, ViCropConfig(layer=1)))
    joint_tokens, joint = _layer0_tokens(
        mllm, lambda: importance_maps(mllm, images, questions, ViCropConfig(layer=1, shared_prefix=False)))
    # the image tokens (16 per image on the tiny LLaVA) went through the decoder once, not twice
    assert shared_tokens < joint_tokens - 16 * len(images)
    for (m_s, view_s, raw_s), (m_j, view_j, raw_j) in zip(shared, joint):
        assert view_s == view_j
        np.testing.assert_allclose(m_s, m_j, rtol=1e-4)
        for key in ("question", "generic"):
            np.testing.assert_allclose(raw_s[key], raw_j[key], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("family", SHARED_PREFIX_FAMILIES)
def test_shared_prefix_capture_equals_the_joint_batch_with_other_padding(tiny_mllm, family):
    """Two samples of different image sizes (different image token counts on LLaVA-NeXT and the
    Qwen families) and question lengths, so left padding differs between every row: the shared-prefix
    capture equals the joint batch's at every key, and it really ran (the prefix pass carried the
    image tokens once: the first decoder layer saw fewer positions than the joint batch's)."""
    from innersight.look.maps import forward_capture, pair_capture
    from innersight.look.vicrop import generic_prompt

    mllm = tiny_mllm(family)
    questions = ["what is the digit in the red circle on the left?", "colour?"]
    images = [_scene(120, 60, seed=7), _scene(50, 90, seed=8)]
    generic = [generic_prompt(q, ViCropConfig()) for q in questions]
    batch = mllm.prepare([[im] for im in images] * 2, questions + generic)
    mask = batch.inputs["attention_mask"]
    assert len(set(mask.sum(-1).tolist())) >= 3  # rows padded differently (equal image token counts on LLaVA-1.5)
    counts = [batch.layouts[b][0].num_tokens for b in range(2)]
    shared_tokens, shared = _layer0_tokens(mllm, lambda: pair_capture(mllm, batch, 1))
    joint_tokens, joint = _layer0_tokens(mllm, lambda: forward_capture(mllm, batch, 1, stop_after=True))
    assert shared is not None, f"{family}: the shared-prefix path declined"
    assert shared_tokens <= joint_tokens - sum(counts)  # each image's tokens went through once, not twice
    torch.testing.assert_close(shared, joint, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_shared_prefix_needs_the_familys_positions(tiny_mllm, monkeypatch, family):
    """With counted positions instead of M-RoPE's, the shared-prefix capture would differ from the
    joint batch's: the equality above rests on batch_positions (and not on chance)."""
    from innersight.adapters.base import Adapter
    from innersight.look.maps import forward_capture, pair_capture
    from innersight.look.vicrop import generic_prompt

    mllm = tiny_mllm(family)
    q = "what is the digit in the red circle?"
    a = mllm.adapter
    batch = mllm.prepare([[_scene(120, 60, seed=9)]] * 2, [q, generic_prompt(q, ViCropConfig())])
    joint = forward_capture(mllm, batch, 1, stop_after=True)
    positions = a.batch_positions(batch)
    assert positions.shape == (4, *batch.input_ids.shape)
    counted = Adapter.prompt_positions(a, batch, batch.input_ids, batch.inputs["attention_mask"], [])  # [B, L]
    assert not torch.equal(positions[1:], counted[None].expand(3, -1, -1))  # M-RoPE differs from counts
    monkeypatch.setattr(type(a), "batch_positions", lambda self, b: Adapter.prompt_positions(
        self, b, b.input_ids, b.inputs["attention_mask"], []))
    wrong = pair_capture(mllm, batch, 1)
    assert wrong is not None and not torch.allclose(wrong, joint, rtol=1e-4, atol=1e-6)


def test_rel_att_shared_prefix_declines_other_families(tiny_mllm):
    from innersight.look.maps import pair_capture
    from innersight.look.vicrop import generic_prompt

    for family in ("gemma3", "instructblip"):
        mllm = tiny_mllm(family)
        q = "what is it?"
        batch = mllm.prepare([_scene()] * 2, [q, generic_prompt(q, ViCropConfig())])
        assert pair_capture(mllm, batch, 1) is None, family


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_grad_att_records_the_graph_from_its_layer_on(tiny_mllm, family):
    mllm = tiny_mllm(family)
    layers = mllm.adapter.decoder_layers
    seen = {}

    def record(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            seen[index] = hidden.requires_grad
        return hook

    handles = [layers[i].register_forward_hook(record(i)) for i in (0, 1)]
    try:
        importance_maps(mllm, [_scene()], ["what is it?"], ViCropConfig(variant="grad-att", layer=1))
    finally:
        for h in handles:
            h.remove()
    assert seen == {0: False, 1: True}  # no graph below the capture layer, one from it on
    with torch.no_grad():
        importance_maps(mllm, [_scene()], ["what is it?"], ViCropConfig(variant="grad-att", layer=1))
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("variant", ["grad-att", "pure-grad"])
def test_gradient_maps_freeze_parameters_for_the_pass_only(tiny_mllm, monkeypatch, variant):
    mllm = tiny_mllm("llava")
    before = [p.requires_grad for p in mllm.model.parameters()]
    assert any(before)
    frozen_during = []
    original = mllm.model.forward

    @functools.wraps(original)  # the forward's signature (its cache argument) stays readable
    def spy(*args, **kwargs):
        frozen_during.append(not any(p.requires_grad for p in mllm.model.parameters()))
        return original(*args, **kwargs)

    monkeypatch.setattr(mllm.model, "forward", spy)
    importance_maps(mllm, [_scene()], ["what is it?"], ViCropConfig(variant=variant, layer=1))
    assert frozen_during and all(frozen_during)  # every forward of the map (prefix and suffix passes)
    monkeypatch.setattr(mllm.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        importance_maps(mllm, [_scene()], ["what is it?"], ViCropConfig(variant=variant, layer=1))
    monkeypatch.undo()
    assert [p.requires_grad for p in mllm.model.parameters()] == before


@pytest.mark.parametrize("family", SHARED_PREFIX_FAMILIES)
@pytest.mark.parametrize("variant", ["grad-att", "pure-grad"])
def test_gradient_maps_shared_prefix_same_maps_less_work(tiny_mllm, family, variant):
    """grad-att (the prefix without a graph, the question's suffix differentiated) and pure-grad
    (one graph from the pixels through the shared prefix, two backward passes) give the maps of
    the full prompts, with images of different sizes and questions of different lengths (rows
    padded differently), while each image's tokens went through the decoder once."""
    mllm = tiny_mllm(family)
    images = [_scene(120, 60, seed=11), _scene(50, 90, seed=12)]
    questions = ["what is the digit in the red circle on the left?", "colour?"]
    shared_tokens, shared = _layer0_tokens(
        mllm, lambda: importance_maps(mllm, images, questions, ViCropConfig(variant=variant, layer=1)))
    joint_tokens, joint = _layer0_tokens(
        mllm, lambda: importance_maps(mllm, images, questions,
                                      ViCropConfig(variant=variant, layer=1, shared_prefix=False)))
    batch = mllm.prepare([[im] for im in images], questions)
    image_tokens = sum(batch.layouts[b][0].num_tokens for b in range(len(images)))
    if variant == "pure-grad":  # the generic row's image tokens are not run again
        assert shared_tokens <= joint_tokens - image_tokens
    # (grad-att's prefix and suffix are its one prompt, split: its saving is the graph, tested below)
    assert shared_tokens >= image_tokens  # and the images did run
    for (m_s, view_s, raw_s), (m_j, view_j, raw_j) in zip(shared, joint):
        assert view_s == view_j
        assert np.abs(m_j).max() > 0
        np.testing.assert_allclose(m_s, m_j, rtol=1e-3, atol=1e-6 * np.abs(m_j).max())
        for key in raw_j:
            np.testing.assert_allclose(raw_s[key], raw_j[key], rtol=1e-3, atol=1e-6 * np.abs(raw_j[key]).max())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_grad_att_shared_prefix_differentiates_the_suffix_only(tiny_mllm, family):
    """The graph of grad-att's shared path holds the question's suffix only: the capture layer's
    graph input has the suffix's rows, not the prompt's."""
    mllm = tiny_mllm(family)
    layer = mllm.adapter.decoder_layers[1]
    seen = []

    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((torch.is_grad_enabled(), int(hidden.shape[1])))

    batch = mllm.prepare([[_scene(seed=13)]], ["what is it?"])
    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        importance_maps(mllm, [_scene(seed=13)], ["what is it?"], ViCropConfig(variant="grad-att", layer=1))
    finally:
        handle.remove()
    image_end = int(batch.layouts[0][0].positions.max()) + 1
    length = int(batch.input_ids.shape[1])
    # the prefix pass (no graph) then the suffix pass (the graph from this layer on)
    assert [s[1] for s in seen] == [image_end, length - image_end]
    assert seen[0][0] is False


def test_gradient_shared_prefix_declines_where_the_family_cannot_split(tiny_mllm):
    from innersight.look.maps import AttentionCapture, shared_prefix_grad_att
    from innersight.look.pure_grad import shared_prefix_pixel_gradients

    for family in ("gemma3", "instructblip"):
        mllm = tiny_mllm(family)
        batch = mllm.prepare([[_scene()]], ["what is it?"])
        assert shared_prefix_grad_att(mllm, batch, AttentionCapture(1, stop_after=False, keep_graph=True)) is None
        pair = mllm.prepare([[_scene()]] * 2, ["what is it?", "describe it."])
        assert shared_prefix_pixel_gradients(mllm, pair, 1) is None, family
