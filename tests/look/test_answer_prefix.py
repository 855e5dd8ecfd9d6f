"""ViCrop rel-att's answer continued from the capture's prefix KV cache (look/answer_prefix.py):
the same tokens and first-step logits as the answer from the prompt, on every family it runs for;
the answer really continued from the cache (less decoder work, the cache grown by generate); the
fallback taken and recorded where it is not exact (other methods, batch > 1, a tiled image, a
family that cannot split its image inputs); the model and the scope restored after exit and
exception; the transformers conventions it relies on (continue-from-cache generate under the
cache argument's name, the cache's per-layer tensors) checked on their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from innersight import flow
from innersight.generation_calls import cache_argument
from innersight.look import answer_prefix as AP
from innersight.look import vicrop as V

REUSING = ("llava", "llava_next")  # the families whose adapters split their image inputs
QUESTION = "what is the digit in the red circle?"
SETTINGS = {"vicrop-rel-att": {"layer": 1}}


def _scene(w: int = 90, h: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


class Scores:
    """A caller's logits processor that records every step's scores (returns them unchanged)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.detach().clone())  # [B, V]
        return scores


def _answer(mllm, image, *, tokens: int = 6, methods=("vicrop-rel-att",), settings=None, **generation):
    scores = Scores()
    answer = mllm.answer(image, QUESTION, methods=list(methods), settings=settings or SETTINGS,
                         max_new_tokens=tokens, logits_processor=[scores], **generation)
    return answer, scores


def _without_reuse(monkeypatch) -> None:
    monkeypatch.setattr(flow.Plan, "prefill_conflict", lambda self, generation: "disabled by the test")


def _layer0_positions(mllm, run):
    """(positions the first decoder layer processed, run())."""
    seen = []

    def count(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append(int(hidden.shape[0] * hidden.shape[1]))

    hook = mllm.adapter.decoder_layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        result = run()
    finally:
        hook.remove()
    return sum(seen), result


@pytest.mark.parametrize("family", REUSING)
@pytest.mark.parametrize("seed,size", [(0, (90, 60)), (1, (50, 120))])
def test_same_answer_and_logits_as_from_the_prompt(tiny_mllm, monkeypatch, family, seed, size):
    mllm = tiny_mllm(family)
    image = _scene(*size, seed=seed)
    reused_work, (reused, reused_scores) = _layer0_positions(mllm, lambda: _answer(mllm, image))
    detail = reused.details["vicrop-rel-att"]["answer_prefix"]
    assert detail["reused"] is True and detail["tokens"] > 0, detail
    _without_reuse(monkeypatch)
    plain_work, (plain, plain_scores) = _layer0_positions(mllm, lambda: _answer(mllm, image))
    assert plain.details["vicrop-rel-att"]["answer_prefix"] == {"reused": False, "why": "disabled by the test"}
    assert reused.token_ids == plain.token_ids and len(plain.token_ids) > 1
    assert reused.box == plain.box
    assert len(reused_scores.steps) == len(plain_scores.steps) == len(plain.token_ids)
    for a, b in zip(reused_scores.steps, plain_scores.steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the answer's first image and the shared prefix went through the decoder once, not twice
    assert reused_work <= plain_work - detail["tokens"]


@pytest.mark.parametrize("family", REUSING)
@pytest.mark.parametrize("variant", ["grad-att", "pure-grad"])
def test_gradient_variants_answer_from_their_prefix(tiny_mllm, monkeypatch, family, variant):
    """grad-att's prefix (run without a graph) and pure-grad's (run with the graph from the pixels,
    kept detached) carry the final answer as rel-att's does: same tokens and scores as the answer
    from the prompt, less decoder work."""
    mllm = tiny_mllm(family)
    name = f"vicrop-{variant}"
    settings = {name: {"layer": 1}}
    image = _scene(seed=5)
    reused_work, (reused, reused_scores) = _layer0_positions(
        mllm, lambda: _answer(mllm, image, methods=(name,), settings=settings))
    detail = reused.details[name]["answer_prefix"]
    assert detail["reused"] is True and detail["tokens"] > 0, detail
    _without_reuse(monkeypatch)
    plain_work, (plain, plain_scores) = _layer0_positions(
        mllm, lambda: _answer(mllm, image, methods=(name,), settings=settings))
    assert plain.details[name]["answer_prefix"]["reused"] is False
    assert reused.token_ids == plain.token_ids and reused.box == plain.box
    assert len(reused_scores.steps) == len(plain_scores.steps) >= len(plain.token_ids) > 0
    for a, b in zip(reused_scores.steps, plain_scores.steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert reused_work <= plain_work - detail["tokens"]
    assert not any(t.requires_grad for t in _kept_tensors(monkeypatch, mllm, image, name, settings))


def _kept_tensors(monkeypatch, mllm, image, name, settings):
    """The tensors the keeper of one answer held (its prefix's keys, values and image inputs)."""
    monkeypatch.undo()
    kept = []
    original = AP.PrefixKeeper.keep

    def spy(self, cache, ids, images):
        original(self, cache, ids, images)
        part = self.parts[-1]  # what this capture kept
        kept.extend(t for pair in part.layers for t in pair)
        kept.extend(v for v in part.image_inputs.values() if isinstance(v, torch.Tensor))

    monkeypatch.setattr(AP.PrefixKeeper, "keep", spy)
    _answer(mllm, image, methods=(name,), settings=settings)
    assert kept
    return kept


@pytest.mark.parametrize("family", REUSING)
def test_sampling_from_the_cache_equals_sampling_from_the_prompt(tiny_mllm, monkeypatch, family):
    mllm = tiny_mllm(family)
    image = _scene(seed=3)
    torch.manual_seed(7)
    reused, _ = _answer(mllm, image, tokens=5, do_sample=True, temperature=1.5)
    assert reused.details["vicrop-rel-att"]["answer_prefix"]["reused"] is True
    _without_reuse(monkeypatch)
    torch.manual_seed(7)
    plain, _ = _answer(mllm, image, tokens=5, do_sample=True, temperature=1.5)
    assert reused.token_ids == plain.token_ids


def test_fallback_with_another_method(tiny_mllm):
    mllm = tiny_mllm("llava")
    image = _scene(seed=4)
    alone, _ = _answer(mllm, image)
    assert alone.details["vicrop-rel-att"]["answer_prefix"]["reused"] is True
    for other in ("var", "deco"):
        composed, _ = _answer(mllm, image, methods=("vicrop-rel-att", other))
        assert composed.details["vicrop-rel-att"]["answer_prefix"] == {"reused": False,
                                                                        "why": "other methods in the plan"}


def test_fallback_with_generation_settings_that_add_rows(tiny_mllm):
    mllm = tiny_mllm("llava")
    answer, _ = _answer(mllm, _scene(seed=5), num_beams=2)
    assert answer.details["vicrop-rel-att"]["answer_prefix"] == {"reused": False,
                                                                 "why": "generation settings num_beams"}


def _batch_scores(mllm, images, questions, methods, settings, tokens=4, **generation):
    scores = Scores()
    answers = mllm.answer_batch(images, questions, methods=list(methods), settings=settings,
                                max_new_tokens=tokens, logits_processor=[scores], **generation)
    return answers, scores


@pytest.mark.parametrize("family,variant", [("llava", "rel-att"), ("llava_next", "rel-att"),
                                            ("llava", "grad-att"), ("llava_next", "pure-grad")])
def test_batch_continues_from_the_prefix_as_from_the_prompt(tiny_mllm, monkeypatch, family, variant):
    """A batch of three (images of different sizes, questions of different lengths: every row
    padded differently in the prompt batch, and on LLaVA-NeXT different image token counts) answers
    from the kept prefix rows: same tokens and every step's scores as the left-padded prompt batch,
    less decoder work."""
    mllm = tiny_mllm(family)
    name = f"vicrop-{variant}"
    settings = {name: {"layer": 1}}
    images = [_scene(seed=6), _scene(70, 90, seed=7), _scene(120, 50, seed=8)]
    questions = [QUESTION, "what colour is the star?", "is it?"]
    reused_work, (answers, reused_scores) = _layer0_positions(
        mllm, lambda: _batch_scores(mllm, images, questions, (name,), settings))
    for a in answers:
        detail = a.details[name]["answer_prefix"]
        assert detail["reused"] is True and detail["tokens"] > 0, detail
    _without_reuse(monkeypatch)
    plain_work, (before, plain_scores) = _layer0_positions(
        mllm, lambda: _batch_scores(mllm, images, questions, (name,), settings))
    assert [a.token_ids for a in answers] == [b.token_ids for b in before]
    assert [a.box for a in answers] == [b.box for b in before]
    assert len(reused_scores.steps) == len(plain_scores.steps) > 0
    for x, y in zip(reused_scores.steps, plain_scores.steps):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert reused_work <= plain_work - answers[0].details[name]["answer_prefix"]["tokens"]


@pytest.mark.parametrize("variant", ["rel-att", "grad-att"])
def test_batch_mapped_in_chunks_continues_from_every_chunks_prefix(tiny_mllm, monkeypatch, variant):
    """``max_batch`` smaller than the batch: the map runs in chunks (one capture each, images of
    different sizes); the answer takes each sample's prefix from its chunk's capture, with the
    prompt batch's tokens and scores."""
    mllm = tiny_mllm("llava_next")
    name = f"vicrop-{variant}"
    settings = {name: {"layer": 1, "max_batch": 2}}  # rel-att: one sample per chunk; grad-att: two
    images = [_scene(seed=12), _scene(70, 90, seed=13), _scene(120, 50, seed=14)]
    questions = [QUESTION, "what colour is the star?", "is it?"]
    captures = []
    original = AP.PrefixKeeper.keep

    def spy(self, cache, ids, image_inputs):
        captures.append(len(ids))
        original(self, cache, ids, image_inputs)

    monkeypatch.setattr(AP.PrefixKeeper, "keep", spy)
    answers, scores = _batch_scores(mllm, images, questions, (name,), settings)
    assert captures == ([1, 1, 1] if variant == "rel-att" else [2, 1])
    assert all(a.details[name]["answer_prefix"]["reused"] is True for a in answers)
    monkeypatch.undo()
    _without_reuse(monkeypatch)
    before, plain = _batch_scores(mllm, images, questions, (name,), settings)
    assert [a.token_ids for a in answers] == [b.token_ids for b in before]
    assert len(scores.steps) == len(plain.steps) > 0
    for x, y in zip(scores.steps, plain.steps):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_captures_of_other_images_are_declined(tiny_mllm):
    """A capture of other images than the answer's first ones (here: the samples' order swapped)
    is refused by the image check, not used."""
    mllm = tiny_mllm("llava")
    images = [_scene(seed=15), _scene(70, 90, seed=16)]
    with AP.keeping_prefix() as keeper:
        V.choose_crops(mllm, images[::-1], [QUESTION] * 2, V.ViCropConfig(layer=1))
    start = AP.AnswerPrefix(keeper.kept)
    batch = flow.build_batch(mllm.adapter, [[im] for im in images], [QUESTION] * 2)
    assert start(mllm, batch) is None
    assert start.outcome == {"reused": False, "why": "the answer's first image is not the captured image"}


def test_batch_with_rows_left_uncropped_continues_from_the_prefix(tiny_mllm, monkeypatch):
    """The post-map gate leaves some rows with their image only: those rows' prompts hold no
    later image, the others' crops are split off per sample."""
    from innersight.look import gate

    mllm = tiny_mllm("llava")
    name = "vicrop-rel-att"
    calls = []

    def alternate(imap, threshold, statistic):
        calls.append(imap)
        return len(calls) % 2 == 1  # rows 0 and 2 crop, row 1 does not

    monkeypatch.setattr(gate, "keeps_crop", alternate)
    images = [_scene(seed=9), _scene(70, 90, seed=10), _scene(120, 50, seed=11)]
    questions = [QUESTION, "what colour is the star?", "is it?"]
    answers, scores = _batch_scores(mllm, images, questions, (name,), SETTINGS)
    assert [a.box is not None for a in answers] == [True, False, True]
    assert all(a.details[name]["answer_prefix"]["reused"] is True for a in answers)
    calls.clear()
    _without_reuse(monkeypatch)
    monkeypatch.setattr(gate, "keeps_crop", alternate)
    before, plain = _batch_scores(mllm, images, questions, (name,), SETTINGS)
    assert [a.token_ids for a in answers] == [b.token_ids for b in before]
    for x, y in zip(scores.steps, plain.steps):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_fallback_for_a_tiled_image(tiny_mllm):
    mllm = tiny_mllm("llava")
    image = _scene(200, 60, seed=8)
    answer, _ = _answer(mllm, image, settings={"vicrop-rel-att": {"layer": 1, "tile_max_side": 60}})
    assert answer.details["vicrop-rel-att"]["tiles"] is not None
    assert answer.details["vicrop-rel-att"]["answer_prefix"] == {
        "reused": False, "why": "a tiled image (its maps' prefixes are tiles)"}


def test_kept_rows_must_be_the_answers_samples(tiny_mllm):
    mllm = tiny_mllm("llava")
    images = [_scene(seed=17), _scene(70, 90, seed=18)]
    with AP.keeping_prefix() as keeper:
        V.choose_crops(mllm, images, [QUESTION] * 2, V.ViCropConfig(layer=1))
    start = AP.AnswerPrefix(keeper.kept)
    assert start(mllm, flow.build_batch(mllm.adapter, [[images[0]]], [QUESTION])) is None
    assert start.outcome == {"reused": False, "why": "the captures kept 2 prefix rows for 1 answer rows (tiles?)"}


@pytest.mark.parametrize("family,runs_every_layer", [("llava", True), ("qwen2_vl", False)])
def test_the_prefix_runs_every_layer_only_where_the_answer_can_use_it(tiny_mllm, family, runs_every_layer):
    """rel-att's prefix pass runs past its capture layer (to fill every layer's cache) only for a
    family whose answer can continue from it: Qwen's cannot, so its map costs what it did."""
    mllm = tiny_mllm(family)
    last = mllm.adapter.decoder_layers[-1]
    calls = []
    hook = last.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    try:
        with AP.keeping_prefix() as keeper:
            V.choose_crops(mllm, [_scene(seed=19)], [QUESTION], V.ViCropConfig(layer=0))
    finally:
        hook.remove()
    assert len(mllm.adapter.decoder_layers) > 1  # the capture layer is not the last
    assert bool(calls) is runs_every_layer
    assert (keeper.kept is not None) is runs_every_layer


def test_fallback_for_the_joint_capture(tiny_mllm):
    mllm = tiny_mllm("llava")
    answer, _ = _answer(mllm, _scene(seed=9), settings={"vicrop-rel-att": {"layer": 1, "shared_prefix": False}})
    assert answer.details["vicrop-rel-att"]["answer_prefix"]["reused"] is False


@pytest.mark.parametrize("family", ["internvl", "qwen2_vl"])
def test_fallback_where_the_family_does_not_split(tiny_mllm, monkeypatch, family):
    mllm = tiny_mllm(family)
    image = _scene(seed=10)
    answer, _ = _answer(mllm, image, tokens=3)
    detail = answer.details["vicrop-rel-att"]["answer_prefix"]
    assert detail["reused"] is False and detail["why"] in (
        "the family cannot split its image inputs", "no prefix capture",
        "inputs beyond the ids, the mask and the image inputs"), detail  # Qwen: mm_token_type_ids
    _without_reuse(monkeypatch)
    before, _ = _answer(mllm, image, tokens=3)
    assert answer.token_ids == before.token_ids


def _plain_logits(mllm):
    batch = mllm.prepare([_scene(seed=11)], [QUESTION])
    with torch.inference_mode():
        return mllm.model(**batch.inputs).logits  # [1, L, V]


@pytest.mark.parametrize("where", ["exit", "capture", "start", "generate"])
def test_restored_after_exit_and_exception(tiny_mllm, monkeypatch, where):
    mllm = tiny_mllm("llava")
    before = _plain_logits(mllm)
    if where == "capture":  # after the capture kept its prefix, before the answer
        original = V.choose_crops

        def fail_after(*args, **kwargs):
            original(*args, **kwargs)
            assert AP.active_keeper() is not None and AP.active_keeper().kept is not None
            raise RuntimeError("boom")

        monkeypatch.setattr(V, "choose_crops", fail_after)
    elif where == "start":  # in the answer's prefill forward, its stop handler installed
        monkeypatch.setattr(AP, "stop_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    elif where == "generate":
        monkeypatch.setattr(type(mllm), "generate", lambda self, batch, **g: (_ for _ in ()).throw(RuntimeError("boom")))
    if where == "exit":
        answer, _ = _answer(mllm, _scene(seed=12))
        assert answer.details["vicrop-rel-att"]["answer_prefix"]["reused"] is True
    else:
        with pytest.raises(RuntimeError, match="boom"):
            _answer(mllm, _scene(seed=12))
    monkeypatch.undo()
    assert AP.active_keeper() is None
    torch.testing.assert_close(_plain_logits(mllm), before, rtol=0, atol=0)


# ---------------------------------------------------------------------- the conventions it relies on
@pytest.mark.parametrize("family", REUSING)
def test_generate_continues_from_a_prefilled_cache(tiny_mllm, family):
    """transformers' "continue from a cache": ``generate`` with the full ids and mask, no image
    inputs, and a cache holding all but the last prompt position (passed under
    :func:`cache_argument`'s name) gives the tokens of ``generate`` from the prompt, and grows
    that cache."""
    from transformers import DynamicCache

    mllm = tiny_mllm(family)
    batch = mllm.prepare([_scene(seed=13)], [QUESTION])
    model, ids, mask = mllm.model, batch.inputs["input_ids"], batch.inputs["attention_mask"]
    kwargs = mllm.generation_kwargs(max_new_tokens=5)
    with torch.inference_mode():
        plain = model.generate(**batch.inputs, **kwargs)  # [1, L + 5]
        name = cache_argument(model.forward)
        cache = DynamicCache()
        images = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask")}
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **{name: cache}, **images)
        assert cache.get_seq_length() == ids.shape[1] - 1
        continued = model.generate(input_ids=ids, attention_mask=mask, **{name: cache}, **kwargs)
    assert torch.equal(continued, plain)
    assert cache.get_seq_length() >= ids.shape[1]


def test_cache_layers_rebuild_the_cache(tiny_mllm):
    """The kept prefix reads each layer's ``keys`` / ``values`` (``cache.layers``) and
    :func:`AP.aligned_cache` rebuilds a cache of the first positions from them."""
    from transformers import DynamicCache

    mllm = tiny_mllm("llava")
    batch = mllm.prepare([_scene(seed=14)], [QUESTION])
    cache = DynamicCache()
    with torch.inference_mode():
        mllm.model(**batch.inputs, use_cache=True, **{cache_argument(mllm.model.forward): cache})
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    assert len(layers) == mllm.adapter.num_layers
    kept = AP.KeptPrefix([batch.input_ids[0]], {}, layers)  # one unpadded row: the whole prompt
    rebuilt = AP.aligned_cache([kept], [5])
    assert rebuilt.get_seq_length() == 5
    for (k, v), layer in zip(layers, rebuilt.layers):
        assert torch.equal(layer.keys, k[:, :, :5]) and torch.equal(layer.values, v[:, :, :5])


def test_keeper_refuses_an_unexpected_cache_layout():
    class Layer:
        keys = values = torch.zeros(2, 1, 4, 3)  # two rows for a one-sample prefix

    class Cache:
        layers = [Layer()]

    with pytest.raises(RuntimeError, match="cache layout"):
        AP.PrefixKeeper().keep(Cache(), [torch.arange(4)], {})


def test_verify_fails_loudly_when_generate_ignores_the_cache(tiny_mllm):
    mllm = tiny_mllm("llava")
    lists = [[_scene(seed=15), _scene(30, 30, seed=16)]]
    with AP.keeping_prefix() as keeper:
        V.choose_crops(mllm, [lists[0][0]], [QUESTION], V.ViCropConfig(layer=1))
    start = AP.AnswerPrefix(keeper.kept)
    batch = flow.build_batch(mllm.adapter, lists, [QUESTION])
    continued = start(mllm, batch)
    assert continued is not None and start.outcome["reused"] is True
    assert set(continued.batch.inputs) == {"input_ids", "attention_mask"}
    with pytest.raises(RuntimeError, match="did not continue"):
        continued.verify()  # generate never ran on the cache


def test_prefill_conflict():
    from innersight.methods import resolve_methods

    assert resolve_methods(["vicrop-rel-att"]).prefill_conflict({"max_new_tokens": 3, "do_sample": False}) is None
    assert resolve_methods(["vicrop-rel-att", "vcd"]).prefill_conflict({}) == "other methods in the plan"
    assert resolve_methods(["vicrop-rel-att"]).prefill_conflict({"num_return_sequences": 2}) == \
        "generation settings num_return_sequences"


def test_llava_next_same_image_inputs_ignores_tile_padding(tiny_mllm):
    adapter = tiny_mllm("llava_next").adapter
    sizes = torch.tensor([[60, 90]])
    tiles = adapter.tiles_per_image(type("B", (), {"inputs": {"image_sizes": sizes}})())[0]
    pixels = torch.randn(1, tiles, 3, 4, 4)
    padded = torch.cat([pixels, torch.randn(1, 2, 3, 4, 4)], dim=1)  # padding tiles: any values
    assert adapter.same_image_inputs({"pixel_values": pixels, "image_sizes": sizes},
                                     {"pixel_values": padded, "image_sizes": sizes})
    changed = padded.clone()
    changed[0, tiles - 1, 0, 0, 0] += 1.0  # a real tile differs
    assert not adapter.same_image_inputs({"pixel_values": pixels, "image_sizes": sizes},
                                         {"pixel_values": changed, "image_sizes": sizes})
    assert not adapter.same_image_inputs({"pixel_values": pixels, "image_sizes": sizes},
                                         {"pixel_values": padded, "image_sizes": torch.tensor([[61, 90]])})


@pytest.mark.parametrize("family", REUSING)
def test_post_map_gate_without_a_crop_continues_from_the_prefix(tiny_mllm, monkeypatch, family):
    """The post-map gate may drop the crop: the answer has the original image only, and its
    remaining tokens (the question) carry no image inputs."""
    mllm = tiny_mllm(family)
    image = _scene(seed=17)
    settings = {"vicrop-rel-att": {"layer": 1, "gate_map": "rel-att", "gate": 1e9}}
    reused, reused_scores = _answer(mllm, image, settings=settings)
    assert reused.details["vicrop-rel-att"]["cropped"] is False
    assert reused.details["vicrop-rel-att"]["answer_prefix"]["reused"] is True
    _without_reuse(monkeypatch)
    plain, plain_scores = _answer(mllm, image, settings=settings)
    assert reused.token_ids == plain.token_ids
    torch.testing.assert_close(reused_scores.steps[0], plain_scores.steps[0], rtol=1e-4, atol=1e-5)
