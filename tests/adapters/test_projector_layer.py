"""The adapter fact "which vision layer's output the projector consumes" (issue 14, item 1), and
DAMRO's default outlier layer read from it, checked against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters.llava import LlavaAdapter
from innersight.decode.damro import OutlierCapture
from innersight.errors import MethodError


def _fake_llava(vision_feature_layer, n_layers: int = 24) -> LlavaAdapter:
    """A LLaVA adapter over a stand-in model: only the config and the vision layer list exist."""
    adapter = object.__new__(LlavaAdapter)
    tower = SimpleNamespace(vision_model=SimpleNamespace(encoder=SimpleNamespace(layers=list(range(n_layers)))))
    adapter.model = SimpleNamespace(config=SimpleNamespace(vision_feature_layer=vision_feature_layer),
                                    model=SimpleNamespace(vision_tower=tower))
    return adapter


@pytest.mark.parametrize(("vfl", "layers", "deepest"), [
    (-2, (22,), 22),  # LLaVA-1.5 on CLIP ViT-L: hidden_states[-2] = hidden_states[23] = output of layers[22]
    (-1, (23,), 23),  # the last layer's output
    (23, (22,), 22),  # positive index into hidden_states: hidden_states[23] again
    (1, (0,), 0),  # the first layer's output
    ([-2, -5, -8, -11], (22, 19, 16, 13), 22),  # multi-layer projectors: the deepest for DAMRO
])
def test_projector_vision_layers_by_hand_for_clip_vit_l(vfl, layers, deepest):
    adapter = _fake_llava(vfl)
    assert adapter.projector_vision_layers == layers
    assert adapter.projector_vision_layer == deepest


@pytest.mark.parametrize("vfl", [0, -25, 25, -26])
def test_projector_vision_layer_refuses_the_embeddings_and_out_of_range(vfl):
    with pytest.raises(MethodError):
        _fake_llava(vfl).projector_vision_layers  # noqa: B018


def test_every_family_names_its_projector_layer(tiny_mllm):
    llava = tiny_mllm("llava", vision_layers=4).adapter  # vision_feature_layer -2
    assert llava.projector_vision_layer == 2
    assert llava.describe()["projector_vision_layer"] == 2
    assert tiny_mllm("llava_next").adapter.projector_vision_layer == 0  # 2 layers, -2: layers[0]
    for family in ("instructblip", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm"):
        adapter = tiny_mllm(family).adapter
        assert adapter.projector_vision_layer == len(adapter.vision_layers) - 1  # the last layer's output


def test_projector_layer_is_the_one_whose_output_the_projector_reads(tiny_mllm):
    """transformers' own semantics: the projector input equals ``layers[projector_vision_layer]``'s output."""
    mllm = tiny_mllm("llava", vision_layers=4)
    adapter = mllm.adapter
    pixels = mllm.prepare([_image(0)], ["what is it?"]).inputs["pixel_values"]
    seen = {}
    handles = [adapter.projector.register_forward_pre_hook(lambda m, a: seen.update(proj=a[0])),
               adapter.vision_layers[adapter.projector_vision_layer].register_forward_hook(
                   lambda m, a, out: seen.update(layer=out[0] if isinstance(out, tuple) else out))]
    try:
        with torch.no_grad():
            adapter.model.model.get_image_features(pixel_values=pixels)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["proj"], seen["layer"][:, 1:])  # [CLS] dropped ("default" strategy)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 90, 3), dtype=np.uint8))


def _cls_scores_by_hand(adapter, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """[N, P]: softmax(q_cls . k / sqrt(D)) over all tokens of ``layers[layer]`` (one head over the
    full q/k, the LLaVA reference), [CLS] column dropped; q/k from that layer's normed input."""
    with torch.no_grad():
        hidden = adapter.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]  # input of layers[layer]
        block = adapter.vision_layers[layer]
        normed = block.layer_norm1(hidden)
        q = block.self_attn.q_proj(normed)  # [N, L, D]
        k = block.self_attn.k_proj(normed)
        dots = torch.einsum("nd,nld->nl", q[:, 0], k) / math.sqrt(q.shape[-1])  # [N, L]
    return torch.softmax(dots.float(), dim=-1)[:, 1:]


def test_damro_default_layer_equals_a_hand_computation_on_a_tiny_clip_with_distinct_layers(tiny_mllm):
    """A 4-layer tiny CLIP with vision_feature_layer -2: DAMRO reads layers[2] (whose output the
    projector consumes), not layers[3] (whose *input* it is, the former default)."""
    mllm = tiny_mllm("llava", vision_layers=4)
    adapter = mllm.adapter
    assert adapter.outlier_vision_layer == 2
    batch = mllm.prepare([_image(0), _image(1)], ["what is it?", "is there a dog?"])
    pixels = batch.inputs["pixel_values"]
    k = 5
    with OutlierCapture(mllm, batch, k=k, reduction="sum_logits") as capture, torch.no_grad():
        mllm.model(**batch.inputs)
    assert capture.layer == 2
    right = _cls_scores_by_hand(adapter, pixels, 2)  # [2, P]
    wrong = _cls_scores_by_hand(adapter, pixels, 3)
    assert not torch.allclose(right, wrong, atol=1e-3)  # the layers are distinguishable
    for i in range(2):
        torch.testing.assert_close(capture.scores[i], right[i], atol=1e-5, rtol=1e-4)
        assert capture.selected[i].tolist() == right[i].topk(k).indices.tolist()
        assert capture.selected[i].tolist() != wrong[i].topk(k).indices.tolist()


def test_damro_default_layers_of_the_other_families(tiny_mllm):
    blip = tiny_mllm("instructblip").adapter
    assert blip.outlier_vision_layer == blip.projector_vision_layer - 1  # reference: encoder.layers[-2]
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        adapter = tiny_mllm(family).adapter
        full = getattr(adapter.config.vision_config, "fullatt_block_indexes", None)
        expected = max(full) if full else len(adapter.vision_layers) - 1
        assert adapter.outlier_vision_layer == expected
