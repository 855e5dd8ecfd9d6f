"""VAR: the closed form on hand-built rows, identity at p = 0, batch = unbatched, decoding with a
KV cache, restoration of the model, on tiny models of every family with planted sinks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.adapters.base import Batch
from innersight.attend.var import TASK_RHO, VAR, VARConfig, redistribute
from innersight.attention import IMPLEMENTATION, text_attention
from innersight.errors import MethodError
from innersight.methods import METHODS, resolve_methods

QUESTIONS = ["what is the color of the circle?", "is there a dog?"]


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


IMAGES = [_image(90, 60, 0), _image(50, 80, 1)]

# keys: [BOS (text sink), image sink, image, image, image, text]
SINKS = torch.tensor([True, True, False, False, False, False])
IMAGE = torch.tensor([False, True, True, True, True, False])


# ---------------------------------------------------------------------- closed form
def test_redistribution_closed_form_by_hand():
    row = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    # image mass 0.8, non-sink image 0.6 (ratio 0.75), sink mass 0.3; p = 0.5 moves 0.15 to the
    # non-sink image tokens in proportion 3:2:1
    new, ok = redistribute(row, SINKS, IMAGE, p=0.5, rho=0.5)
    expected = torch.tensor([0.05, 0.1, 0.375, 0.25, 0.125, 0.1], dtype=torch.float64)
    assert bool(ok)
    torch.testing.assert_close(new, expected)
    assert float(new.sum()) == pytest.approx(1.0, abs=1e-12)
    # p = 1 empties the sinks; p = 0 is the identity
    new, _ = redistribute(row, SINKS, IMAGE, p=1.0, rho=0.5)
    torch.testing.assert_close(new, torch.tensor([0.0, 0.0, 0.45, 0.3, 0.15, 0.1], dtype=torch.float64))
    new, _ = redistribute(row, SINKS, IMAGE, p=0.0, rho=0.5)
    torch.testing.assert_close(new, row)


def test_rows_that_do_not_qualify_are_untouched():
    rows = torch.tensor([
        [0.1, 0.2, 0.3, 0.2, 0.1, 0.1],  # ratio 0.75: below rho 0.8
        [0.5, 0.05, 0.05, 0.02, 0.03, 0.35],  # image mass 0.15 < 0.2
        [0.0, 0.04, 0.4, 0.3, 0.2, 0.06],  # image 0.94, ratio 0.9 / 0.94 = 0.957: qualifies
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # no image attention at all
    ], dtype=torch.float64)
    new, ok = redistribute(rows, SINKS, IMAGE, p=0.6, rho=0.8)
    assert ok.tolist() == [False, False, True, False]
    assert torch.equal(new[[0, 1, 3]], rows[[0, 1, 3]])
    budget = 0.6 * 0.04
    expected = torch.tensor([0.0, 0.04 * 0.4, 0.4 + budget * 0.4 / 0.9, 0.3 + budget * 0.3 / 0.9,
                             0.2 + budget * 0.2 / 0.9, 0.06], dtype=torch.float64)
    torch.testing.assert_close(new[2], expected)
    torch.testing.assert_close(new.sum(dim=-1), torch.ones(4, dtype=torch.float64))


def test_redistribution_broadcasts_over_samples_heads_rows():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 6), dim=-1)  # [B, H, R, K]
    sinks = torch.stack([SINKS, torch.roll(SINKS, 2)])[:, None, None, :]  # per-sample masks [B, 1, 1, K]
    image = torch.stack([IMAGE, IMAGE])[:, None, None, :]
    new, ok = redistribute(probs, sinks, image, p=0.6, rho=0.0, min_image_attention=0.0)
    assert new.shape == probs.shape and ok.shape == (2, 3, 4)
    torch.testing.assert_close(new.sum(dim=-1), torch.ones(2, 3, 4))
    for b in range(2):
        for h in range(3):
            for r in range(4):
                one, one_ok = redistribute(probs[b, h, r], sinks[b, 0, 0], image[b, 0, 0], p=0.6, rho=0.0,
                                           min_image_attention=0.0)
                torch.testing.assert_close(new[b, h, r], one)
                assert bool(ok[b, h, r]) == bool(one_ok)


# ---------------------------------------------------------------------- configuration
def test_config_defaults_presets_and_validation():
    config = VARConfig()
    assert (config.effective_p, config.effective_rho, config.min_image_attention, config.tau) == (0.6, 0.8, 0.2, 20.0)
    assert config.preset == "paper" and config.p is None
    assert config.sink_dims is None
    assert TASK_RHO == {"general": 0.8, "hallucination": 0.5, "vision-centric": 0.9}
    assert VARConfig(task="hallucination").effective_rho == 0.5
    assert VARConfig(task="vision-centric", rho=0.3).effective_rho == 0.3  # rho given wins
    fields = {f.name: f for f in dataclasses.fields(VARConfig)}
    assert "2503.03321" in fields["p"].metadata["source"]
    assert fields["p"].metadata["reference_code"] == "1 - p"
    assert fields["rho"].metadata["reference_code"] == "1 - rho"
    for bad in ({"p": 1.5}, {"preset": "reference"}, {"task": "magic"}, {"rho": -0.1}, {"tau": 0.0}, {"sink_dims": (-1,)},
                {"detect_recurrence": 0.0}):
        with pytest.raises(MethodError):
            VARConfig(**bad)


def test_registered_as_attention_method():
    spec = METHODS["var"]
    assert (spec.point, spec.key) == ("attention", "var")
    plan = resolve_methods(["var"], {"var": {"task": "vision-centric", "sink_dims": "3, 7", "p": "0.4"}})
    (method,) = plan.objects
    assert isinstance(method, VAR)
    assert method.config.effective_rho == 0.9 and method.config.sink_dims == (3, 7) and method.config.p == 0.4
    with pytest.raises(MethodError, match="task must be one of"):
        resolve_methods(["var"], {"var": {"task": "everything"}})


# ---------------------------------------------------------------------- on tiny models
def _settings(plant, **extra):
    return {"var": {"sink_dims": plant.dims, "tau": plant.tau, "rho": 0.3, **extra}}


def _logits(mllm, batch, var=None):
    with torch.no_grad():
        if var is None:
            return mllm.model(**batch.inputs).logits.float()
        with var.activate(mllm, batch):
            return mllm.model(**batch.inputs).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_p_zero_is_the_identity_and_p_changes_logits(var_mllm, plant, family):
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    config = VARConfig(sink_dims=plant.dims, tau=plant.tau, rho=0.3)
    with plant(mllm):
        plain = _logits(mllm, batch)
        zero = VAR(dataclasses.replace(config, p=0.0))
        same = _logits(mllm, batch, zero)
        moved = _logits(mllm, batch, VAR(config))
        plain_ids = [a.token_ids for a in mllm.answer_batch(IMAGES, QUESTIONS, max_new_tokens=4)]
        zero_ids = [a.token_ids for a in mllm.answer_batch(IMAGES, QUESTIONS, methods=["var"],
                                                          settings=_settings(plant, p=0.0), max_new_tokens=4)]
    # p = 0 goes through the explicit-probability path (rows were recomputed) and changes nothing
    assert zero.last_run.stats[2].changed_rows > 0
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    assert zero_ids == plain_ids
    # p > 0 does change the model (the identity above is not vacuous)
    assert float((moved - plain).abs().max()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_unbatched(var_mllm, plant, family):
    mllm = var_mllm(family)
    images = [*IMAGES, _image(64, 64, 2)]
    questions = [*QUESTIONS, "what is the shape in the top left of the picture?"]
    settings = _settings(plant)
    with plant(mllm):
        batched = mllm.answer_batch(images, questions, methods=["var"], settings=settings, max_new_tokens=4)
        single = [mllm.answer(i, q, methods=["var"], settings=settings, max_new_tokens=4)
                  for i, q in zip(images, questions)]
        # and the logits of the prompt's last position, batch against one by one
        batch = mllm.prepare(images, questions)
        var = VAR(VARConfig(**settings["var"]))
        together = _logits(mllm, batch, var)[:, -1]
        assert var.last_run.stats[2].changed_rows > 0
        alone = torch.cat([_logits(mllm, mllm.prepare([i], [q]), VAR(var.config))[:, -1]
                           for i, q in zip(images, questions)])
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert all(a.token_ids for a in batched)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip", "gemma3"])
def test_decoding_with_cache_equals_full_forwards(var_mllm, plant, family):
    """Every generated row is redistributed with the prefill's sinks (generated tokens are never
    sinks): cached greedy decoding equals full forwards of the grown sequence without a cache.
    Gemma 3's tiny model has sliding-window layers (window 20) shorter than its prompts: at a
    decoding step the cache hands over only the window's keys, so key column j is not position j."""
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    config = VARConfig(sink_dims=plant.dims, tau=plant.tau, rho=0.3)
    steps = 3
    with plant(mllm), torch.no_grad():
        var = VAR(config)
        with var.activate(mllm, batch):
            out = mllm.model.generate(**batch.inputs, **mllm.generation_kwargs(max_new_tokens=steps),
                                      output_logits=True, return_dict_in_generate=True)
        decode_rows = var.last_run.stats[2].eligible_rows
        ids = out.sequences  # [B, L0 + steps]
        for step in range(steps):
            length = batch.input_ids.shape[1] + step
            inputs = dict(batch.inputs)
            for name, value in batch.inputs.items():  # per-token inputs grow: mask 1, token types 0 (text)
                if torch.is_tensor(value) and value.shape == batch.input_ids.shape and name != "input_ids":
                    fill = 1 if name == "attention_mask" else 0
                    inputs[name] = torch.cat([value, value.new_full((len(batch), step), fill)], dim=1)
            inputs["input_ids"] = ids[:, :length]
            grown = Batch(inputs=inputs, prompts=batch.prompts, image_sizes=batch.image_sizes, layouts=batch.layouts)
            full = VAR(config)
            logits = _logits(mllm, grown, full)[:, -1]
            assert not full.last_run.sinks[2][:, batch.input_ids.shape[1]:].any()
            torch.testing.assert_close(logits, out.logits[step].float(), rtol=0, atol=1e-4)
    prefill_rows = full.last_run.stats[2].eligible_rows
    # the cached run also changed the decoding rows (one row per sample, head and step)
    assert decode_rows > 0 and prefill_rows > 0


def _restored(mllm, batch, plain):
    model = mllm.model
    assert text_attention(model) == "sdpa"
    for layer in mllm.adapter.decoder_layers:
        assert not any(name.startswith("_innersight") for name in vars(layer.self_attn))
        assert len(layer._forward_pre_hooks) == 0
    torch.testing.assert_close(_logits(mllm, batch), plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_model_restored_after_exit_and_after_an_exception(var_mllm, plant, family):
    mllm = var_mllm(family)
    batch = mllm.prepare(IMAGES, QUESTIONS)
    config = VARConfig(sink_dims=plant.dims, tau=plant.tau, rho=0.3)
    with plant(mllm):
        plain = _logits(mllm, batch)
        var = VAR(config)
        with var.activate(mllm, batch):
            assert text_attention(mllm.model) == IMPLEMENTATION
            mllm.model.generate(**batch.inputs, **mllm.generation_kwargs(max_new_tokens=2))
        _restored(mllm, batch, plain)
        with pytest.raises(RuntimeError, match="user code"):
            with var.activate(mllm, batch):
                _logits(mllm, batch)
                raise RuntimeError("user code")
        _restored(mllm, batch, plain)
        # VAR's own error (a prompt of another length than the activated batch) also restores
        other = mllm.prepare([IMAGES[0]], ["what is the color of the big red circle in the middle?"])
        with pytest.raises(MethodError, match="activated for a batch"):
            with var.activate(mllm, mllm.prepare([IMAGES[0]], ["is it?"])):
                _logits(mllm, other)
        _restored(mllm, batch, plain)


def test_detected_dims_are_used_and_cached(var_mllm, plant, tmp_path):
    mllm = var_mllm("llava")
    batch = mllm.prepare(IMAGES, QUESTIONS)
    var = VAR(VARConfig(tau=plant.tau, rho=0.3))
    with plant(mllm):
        with var.activate(mllm, batch) as run, torch.no_grad():
            mllm.model(**batch.inputs)
    assert set(run.dims) == set(plant.dims)
    assert var.detection is not None and set(var.detection.dims) == set(plant.dims)
    assert run.stats[2].changed_rows > 0
    assert len(list((tmp_path / "cache" / "sinks").glob("*.json"))) == 1


def test_no_sink_dims_changes_nothing(var_mllm):
    mllm = var_mllm("llava")  # random weights: no massive activations, nothing detected
    batch = mllm.prepare(IMAGES, QUESTIONS)
    plain = _logits(mllm, batch)
    var = VAR(VARConfig())
    torch.testing.assert_close(_logits(mllm, batch, var), plain, rtol=0, atol=0)
    assert var.last_run.dims == () and var.detection is not None


def test_sink_dims_outside_the_model_are_refused(var_mllm):
    mllm = var_mllm("llava")
    batch = mllm.prepare(IMAGES[:1], QUESTIONS[:1])
    with pytest.raises(MethodError, match="outside the hidden size"):
        with VAR(VARConfig(sink_dims=(3, 64))).activate(mllm, batch):
            pass


def test_layers_exclude_the_first_two_and_the_last(var_mllm):
    mllm = var_mllm("llava")  # four decoder layers
    assert VAR().layers(mllm) == (2,)
    assert VAR(VARConfig(first_layer=1)).layers(mllm) == (1, 2)
    assert VAR(VARConfig(first_layer=3)).layers(mllm) == ()


def test_beam_search_rows_map_to_their_prompts(var_mllm, plant):
    mllm = var_mllm("qwen2_vl")
    batch = mllm.prepare(IMAGES, QUESTIONS)
    var = VAR(VARConfig(sink_dims=plant.dims, tau=plant.tau, rho=0.3))
    with plant(mllm), var.activate(mllm, batch) as run, torch.no_grad():
        mllm.model.generate(**batch.inputs, **mllm.generation_kwargs(max_new_tokens=2, num_beams=2))
    # the prefill ran 2 x 2 rows; one sink row is kept per prompt, equal to an unexpanded run
    alone = VAR(var.config)
    with plant(mllm), alone.activate(mllm, batch) as single, torch.no_grad():
        mllm.model(**batch.inputs)
    assert torch.equal(run.sinks[2], single.sinks[2])
    assert run.stats[2].changed_rows > single.stats[2].changed_rows > 0
