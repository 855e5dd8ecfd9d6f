"""The ViCrop crop gate: the peak-to-mean ratio by hand, and on the shipped micro model a gate that
never passes gives the plain answer while a gate that always passes gives ViCrop's."""

from __future__ import annotations

import numpy as np
import pytest

from innersight.errors import MethodError
from innersight.look.gate import MICRO_THRESHOLD, keeps_crop, sharpness
from innersight.look.vicrop import ViCropConfig
from innersight.methods import METHODS, resolve_methods


def test_sharpness_by_hand():
    assert sharpness(np.ones((4, 4))) == pytest.approx(1.0)
    one_hot = np.zeros((8, 8))
    one_hot[3, 5] = 2.0
    assert sharpness(one_hot) == pytest.approx(64.0)
    m = np.array([[1.0, 3.0], [-5.0, 0.0]])  # clipped: [1, 3, 0, 0], mean 1
    assert sharpness(m) == pytest.approx(3.0)
    assert sharpness(np.zeros((2, 2))) == 0.0
    assert keeps_crop(np.ones((2, 2)), None) and not keeps_crop(np.ones((2, 2)), 1.5)
    assert keeps_crop(one_hot, 64.0)


def test_gate_setting_and_preset():
    with pytest.raises(MethodError):
        ViCropConfig(gate=0.5)
    spec = METHODS["vicrop-gated"]
    # the name fixes the variant; the threshold is its default, which --set may change
    assert dict(spec.preset) == {"variant": "rel-att"} and dict(spec.defaults) == {"gate": MICRO_THRESHOLD}
    (method,) = resolve_methods(["vicrop-gated"], {"vicrop": {"gate": "5"}}).objects
    assert method.config.gate == 5.0 and method.config.variant == "rel-att"
    assert resolve_methods(["vicrop-rel-att"]).objects[0].config.gate is None


def test_gate_on_the_micro_model():
    import innersight
    from innersight.demo.world import World, WorldConfig

    mllm = innersight.load("micro")
    samples = World(WorldConfig()).eval_samples("read", 4, 7, size_class="small")
    images, questions = [s.image for s in samples], [s.question for s in samples]
    plain = mllm.answer_batch(images, questions, max_new_tokens=6)
    vicrop = mllm.answer_batch(images, questions, methods=["vicrop-rel-att"], max_new_tokens=6)
    never = mllm.answer_batch(images, questions, methods=["vicrop-gated"], settings={"vicrop": {"gate": "1e9"}},
                              max_new_tokens=6)
    always = mllm.answer_batch(images, questions, methods=["vicrop-gated"], settings={"vicrop": {"gate": "1"}},
                               max_new_tokens=6)
    assert [a.token_ids for a in never] == [a.token_ids for a in plain]
    assert [a.token_ids for a in always] == [a.token_ids for a in vicrop]
    assert all(a.crop is None and not a.details["vicrop-gated"]["cropped"] for a in never)
    assert all(a.crop is not None and a.details["vicrop-gated"]["cropped"] for a in always)
    gated = mllm.answer_batch(images, questions, methods=["vicrop-gated"], max_new_tokens=6)
    for a, v, p in zip(gated, vicrop, plain):
        expected = v if a.details["vicrop-gated"]["sharpness"] >= MICRO_THRESHOLD else p
        assert a.token_ids == expected.token_ids
