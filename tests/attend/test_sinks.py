"""Sink scores, sink masks and sink-dimension detection, against hand computations and planted
massive activations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.attend import sinks as S
from innersight.attend.var import VAR, VARConfig
from innersight.errors import MethodError


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------- phi, by hand
def test_sink_scores_by_hand():
    x = torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # RMS 2.5 and 1
    torch.testing.assert_close(S.sink_scores(x, [1]), torch.tensor([1.6, 1.0]))
    torch.testing.assert_close(S.sink_scores(x, [0]), torch.tensor([1.2, 1.0]))
    torch.testing.assert_close(S.sink_scores(x, [0, 1]), torch.tensor([1.6, 1.0]))
    # computed in fp32 from a half-precision state, no learned weight
    half = torch.tensor([[0.0] * 15 + [64.0]], dtype=torch.bfloat16)  # phi = 64 / sqrt(64^2 / 16) = 4
    assert S.sink_scores(half, [15]).dtype == torch.float32
    assert float(S.sink_scores(half, [15])) == pytest.approx(4.0)
    # phi <= sqrt(D), reached by a one-hot state
    assert float(S.sink_scores(torch.eye(9)[:1], [0])) == pytest.approx(3.0)
    assert S.sink_scores(x, []).tolist() == [0.0, 0.0]


def test_sink_mask_uses_tau_and_padding():
    hidden = torch.zeros(2, 3, 4)
    hidden[:, :, 2] = 1.0  # phi over dim 0 = 0
    hidden[0, 1] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # phi over dim 0 = 3 / 1.5 = 2
    hidden[1, 0] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # phi 2, but padding
    valid = torch.tensor([[True, True, True], [False, True, True]])
    assert S.sink_mask(hidden, [0], 2.0, valid).tolist() == [[False, True, False], [False, False, False]]
    assert S.sink_mask(hidden, [0], 2.0).tolist() == [[False, True, False], [True, False, False]]
    assert not S.sink_mask(hidden, [0], 2.01).any()


# ---------------------------------------------------------------------- the massive-activation rule
def _state(seed: int = 0) -> torch.Tensor:
    """[4, 16] hidden state with |a| ~ 0.1 and three large entries."""
    x = torch.from_numpy(np.random.default_rng(seed).uniform(0.05, 0.15, (4, 16))).float()
    x[0, 3] = 500.0  # first token, massive
    x[2, 9] = -400.0  # a later token, massive (sign does not matter)
    x[3, 12] = 60.0  # large, but not > 100
    return x


def test_massive_dims_sun_rule():
    all_dims, first, best = S.massive_dims(_state(), S.DetectionConfig())
    assert all_dims == {3, 9}
    assert first == {3}
    rms0 = math.sqrt(float(_state()[0].pow(2).mean()))
    assert best[3] == pytest.approx(500.0 / rms0, rel=1e-5)
    # ~1000x the median: a median ratio the entries cannot reach removes them
    assert S.massive_dims(_state(), S.DetectionConfig(median_ratio=10_000.0))[0] == set()


def test_massive_dims_relative_thresholds():
    config = S.DetectionConfig(min_abs=None, median_ratio=100.0, rms_ratio=3.0)
    assert S.massive_dims(_state(), config)[0] == {3, 9, 12}
    # top_k keeps only the strongest dims of a token
    x = _state()
    x[0, 5] = 450.0
    assert S.massive_dims(x, S.DetectionConfig(top_k=1))[1] == {3}
    assert S.massive_dims(x, S.DetectionConfig(top_k=2))[1] == {3, 5}


def test_detection_layers_are_middle_layers():
    config = S.DetectionConfig()
    assert config.layers(32) == tuple(range(8, 24))
    assert config.layers(4) == (2,)
    assert config.layers(5) == (2, 3)
    with pytest.raises(MethodError):
        S.DetectionConfig(recurrence=0.0)


def test_published_table_is_a_cross_check():
    assert S.published_dims("llava-hf/llava-1.5-7b-hf", 4096).dims == (2533, 1415)
    assert S.published_dims("lmsys/vicuna-13b-v1.5", 5120).dims == (2100, 4743)
    assert set(S.published_dims("Qwen/Qwen2-VL-7B-Instruct", 3584).dims) == {458, 2570}
    assert set(S.published_dims("Qwen/Qwen2.5-VL-3B-Instruct", 2048).dims) == {318, 1874, 1819}
    assert S.published_dims("llava-hf/llava-1.5-7b-hf", 64) is None  # width must match too
    assert S.published_dims("some/other-model", 4096) is None
    assert not any(entry.verified for entry in S.PUBLISHED_SINK_DIMS)


# ---------------------------------------------------------------------- detection on tiny models
@pytest.fixture(scope="module")
def llava(var_mllm):
    return var_mllm("llava")


def test_detection_finds_the_planted_dims(llava, plant):
    with plant(llava):
        found = S.detect_sink_dims(llava)
    assert set(found.dims) == set(plant.dims)
    assert found.layers == (2,)
    assert found.observations == 3  # three probe prompts x one middle layer
    assert found.first_token_counts == {5: 3, 11: 3}  # the first token carries them in every prompt
    assert found.max_ratio[5] == pytest.approx(math.sqrt(64 / 2), rel=1e-3)
    assert found.published is None and found.agrees_with_published is None


def test_detection_finds_nothing_in_a_random_model(llava):
    assert S.detect_sink_dims(llava).dims == ()


def test_detection_with_relative_thresholds(llava, plant):
    # magnitude 5 fails |a| > 100 but is > 100x the median |a| of the tiny model (~0.03)
    strict = S.DetectionConfig()
    relative = S.DetectionConfig(min_abs=None, median_ratio=20.0, rms_ratio=4.0)
    with plant(llava, magnitude=5.0):
        assert S.detect_sink_dims(llava, config=strict).dims == ()
        assert set(S.detect_sink_dims(llava, config=relative).dims) == set(plant.dims)


def test_detection_uses_the_batches_given(llava, plant):
    batch = llava.prepare([_image(60, 60, 0), _image(40, 70, 1)], ["what is it?", "is there a cat?"])
    with plant(llava, dims=(7, 20)):
        found = S.detect_sink_dims(llava, [batch])
    assert set(found.dims) == {7, 20}
    assert found.observations == 2


def test_cache_roundtrip_and_reuse(llava, plant, tmp_path, monkeypatch):
    with plant(llava):
        first = S.sink_dims_for(llava)
    files = list((tmp_path / "cache" / "sinks").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert set(data["dims"]) == set(plant.dims) and data["version"] == S.CACHE_VERSION

    def boom(*args, **kwargs):
        raise AssertionError("detection ran although the cache holds the answer")

    monkeypatch.setattr(S, "detect_sink_dims", boom)
    again = S.sink_dims_for(llava)  # no plant: only the cache can give the planted dims
    assert again.dims == first.dims and again.counts == first.counts
    # another detection config is another entry
    with pytest.raises(AssertionError, match="cache holds"):
        S.sink_dims_for(llava, S.DetectionConfig(recurrence=0.9))
    # an unreadable file is ignored and detected again
    files[0].write_text("{not json")
    with pytest.raises(AssertionError, match="cache holds"):
        S.sink_dims_for(llava)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INNERSIGHT_CACHE_DIR", str(tmp_path / "x"))
    assert S.cache_dir() == tmp_path / "x" / "sinks"
    monkeypatch.delenv("INNERSIGHT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert S.cache_dir() == tmp_path / "xdg" / "innersight" / "sinks"


def test_layer_input_hooks_are_removed_after_an_exception(llava):
    layers = llava.adapter.decoder_layers
    before = [len(layer._forward_pre_hooks) for layer in layers]
    seen = []
    with pytest.raises(RuntimeError, match="inside"):
        with S.layer_inputs(layers, [1, 2], lambda idx, h: seen.append((idx, tuple(h.shape)))):
            batch = llava.prepare([_image(50, 50, 2)], ["what is it?"])
            with torch.no_grad():
                llava.model(**batch.inputs)
            raise RuntimeError("inside")
    length = batch.input_ids.shape[1]
    assert seen == [(1, (1, length, 64)), (2, (1, length, 64))]
    assert [len(layer._forward_pre_hooks) for layer in layers] == before


# ---------------------------------------------------------------------- sink masks on planted models
@pytest.mark.parametrize("family", FAMILIES)
def test_sink_masks_flag_exactly_the_planted_tokens(var_mllm, plant, family):
    mllm = var_mllm(family)
    batch = mllm.prepare([_image(90, 60, 3), _image(50, 80, 4)], ["what is the color of the circle?", "is it?"])
    expected = torch.zeros_like(batch.input_ids, dtype=torch.bool)  # [B, L]
    for b, layouts in enumerate(batch.layouts):
        first_real = int(batch.inputs["attention_mask"][b].nonzero()[0])
        expected[b, first_real] = True
        positions = torch.cat([lay.positions for lay in layouts])
        expected[b, positions[1::plant.every]] = True
    var = VAR(VARConfig(sink_dims=plant.dims, tau=plant.tau))
    with plant(mllm), var.activate(mllm, batch) as run, torch.no_grad():
        mllm.model(**batch.inputs)
    assert run.layers == (2,)
    assert torch.equal(run.sinks[2], expected)
    image = torch.zeros_like(expected)
    for b, layouts in enumerate(batch.layouts):
        image[b, torch.cat([lay.positions for lay in layouts])] = True
    assert run.stats[2].visual_sinks == (expected & image).sum(dim=1).tolist()
    assert all(n >= 1 for n in run.stats[2].visual_sinks)
