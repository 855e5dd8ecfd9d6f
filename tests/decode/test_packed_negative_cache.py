"""The batched negative branch's packed cache: the negative rows' keys and values at their own
length (not left-padded to the main prompt's), read through innersight's attention dispatcher.

Checked on tiny LLaVA: the same tokens and per-step scores (main, negative, contrast) as the
padded merge and the serial branch, for DAMRO and VCD, batch 1 and a left-padded batch of two
prompt lengths, greedy and seeded sampling; the packed path really runs (details, the cache
layer type, the negative store's length = its own prompt + steps); the model and the shared cache
are restored after exit and after an exception; every private convention it relies on fails
loudly when broken.

Checked on tiny Gemma 3 (five sliding-window layers, then a full one) with windows the negative
rows outgrow (at the prefill, or during the steps): the sliding layers pack too, with the same
tokens and per-step scores as the padded merge and the serial branch (DAMRO, VCD, batch 1 and 2);
their negative store keeps its last ``window - 1`` positions; ICD (a negative prompt longer than
the main one) runs batched and packed with the serial branch's tokens and scores.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from innersight.attention import IMPLEMENTATION, text_attention
from innersight.decode import contrast
from innersight.decode.contrast import ContrastiveProcessor, PackedLayer, SlidingPackedLayer, _PackedState
from innersight.decode.damro import DAMRO, DAMROConfig
from innersight.decode.vcd import VCD, VCDConfig
from innersight.errors import MethodError
from innersight.testing.faults import RaiseOnStep
from innersight.testing.steps import assert_restored_after_exit_and_exception, attention_state

QUESTIONS = ["what is it?", "is there a dog in the picture?"]
#: the three ways to run the negative branch: (branch, negative_cache)
WAYS = {"packed": ("batched", "packed"), "padded": ("batched", "padded"), "serial": ("serial", "packed")}
STEPS = 4


def _processor(mllm, batch, method: str, way: str, alpha: float = 2.0) -> ContrastiveProcessor:
    branch, cache = WAYS[way]
    if method == "icd":
        from innersight.decode.icd import ICD, ICDConfig

        if way == "padded":
            raise ValueError("ICD has no padded merge (its negative prompt is longer than the main one)")
        impl = ICD(ICDConfig(alpha=alpha, branch=branch))
    elif method == "damro":
        impl = DAMRO(DAMROConfig(k=3, alpha=alpha, branch=branch, negative_cache=cache))
    else:
        impl = VCD(VCDConfig(alpha=alpha, branch=branch, negative_cache=cache))
    (proc,) = impl.processors(mllm, batch, {})
    return proc


class _Record(LogitsProcessor):
    """Runs ``proc`` and keeps each step's main scores, negative logits and contrast output, plus
    what ``spy(proc, input_ids)`` returns at that step."""

    def __init__(self, proc: ContrastiveProcessor, spy=None) -> None:
        self.proc, self.spy = proc, spy
        self.steps: list[tuple[torch.Tensor, ...]] = []
        self.seen: list = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = self.proc(input_ids, scores)
        self.steps.append((scores.float().clone(), self.proc.last_negative.clone(), out.float().clone()))
        if self.spy is not None:
            self.seen.append(self.spy(self.proc, input_ids))
        return out


def _run(mllm, batch, proc, *, sample: bool, spy=None, **generation):
    record = _Record(proc, spy)
    if sample:
        generation = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0, **generation}
    with proc, (torch.random.fork_rng() if sample else contextlib.nullcontext()):
        if sample:
            torch.manual_seed(1234)
        ids = mllm.generate(batch, max_new_tokens=STEPS, min_new_tokens=STEPS,
                            logits_processor=LogitsProcessorList([record]), **generation)
    return ids, record


def _assert_same_steps(a: _Record, b: _Record) -> None:
    assert len(a.steps) == len(b.steps) == STEPS
    for step_a, step_b in zip(a.steps, b.steps):
        for x, y in zip(step_a, step_b):  # main scores, negative logits, contrast (-inf where cut)
            assert torch.equal(torch.isinf(x), torch.isinf(y))
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["damro", "vcd"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_packed_equals_padded_and_serial(tiny_mllm, image, method, rows, sample):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(21), image(22, 50, 80)][:rows], QUESTIONS[:rows])
    if rows == 2:  # two prompt lengths: the shorter one is left-padded
        assert not bool(batch.inputs["attention_mask"].bool().all())
    runs = {way: _run(mllm, batch, _processor(mllm, batch, method, way), sample=sample) for way in WAYS}
    for way, (_, record) in runs.items():
        assert record.proc.branch.details()["mode"] == WAYS[way][0]
    assert runs["packed"][1].proc.branch.details()["negative_cache"] == "packed"
    assert runs["padded"][1].proc.branch.details() == {"mode": "batched", "requested": "batched",
                                                       "negative_cache": "padded", "why": "requested"}
    for way in ("padded", "serial"):
        assert runs["packed"][0] == runs[way][0], way
        _assert_same_steps(runs["packed"][1], runs[way][1])
    # the contrast is not the identity here (the comparisons of negative logits are not vacuous)
    main, negative, _ = runs["packed"][1].steps[0]
    assert float((main - negative).abs().max()) > 1e-3


def _store(proc: ContrastiveProcessor, input_ids: torch.Tensor) -> tuple:
    branch = proc.branch
    layers = branch.cache.layers
    return (input_ids.shape[1], branch.negative_length, int(branch.cache.get_seq_length()),
            all(type(layer) is PackedLayer for layer in layers),
            {int(layer.keys.shape[0]) for layer in layers}, {layer.negative_length for layer in layers})


@pytest.mark.parametrize("method", ["damro", "vcd"])
def test_the_packed_path_runs_and_the_negative_store_has_its_own_length(tiny_mllm, image, method):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(23), image(24, 50, 80)], QUESTIONS)
    proc = _processor(mllm, batch, method, "packed")
    _, record = _run(mllm, batch, proc, sample=False, spy=_store)
    assert proc.branch.details() == {"mode": "batched", "requested": "batched", "negative_cache": "packed"}
    prompt, own = batch.input_ids.shape[1], proc.branch.inputs.length
    if method == "damro":  # k outlier tokens in place of the image: a much shorter negative prompt
        assert own < prompt - 10
    assert len(record.seen) == STEPS
    for length, negative, main, packed, main_rows, negative_lengths in record.seen:
        steps = length - prompt  # tokens generated before this step
        assert packed and main_rows == {2}  # generate's cache holds the main rows only
        assert main == prompt + steps
        assert negative == own + steps and negative_lengths == {own + steps}
    assert text_attention(mllm.model) == "sdpa"  # innersight's dispatcher only during the call


def test_the_shared_cache_is_plain_main_rows_after_exit_and_after_an_exception(tiny_mllm, image):
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(25), image(26, 50, 80)], QUESTIONS)
    state = attention_state(mllm)
    for stop in (None, RaiseOnStep(2)):
        proc = _processor(mllm, batch, "damro", "packed")
        caches, seen = [], []

        def spy(proc_, input_ids, caches=caches, seen=seen):
            caches.append(proc_.branch.cache)
            seen.append(text_attention(mllm.model))

        extra = {"stopping_criteria": StoppingCriteriaList([stop])} if stop is not None else {}
        with pytest.raises(RuntimeError, match="boom") if stop is not None else contextlib.nullcontext():
            _run(mllm, batch, proc, sample=False, spy=spy, **extra)
        assert set(seen) == {IMPLEMENTATION}  # the packed rows ran through innersight's dispatcher
        cache = caches[-1]
        assert isinstance(cache, DynamicCache)
        assert all(type(layer) is DynamicLayer for layer in cache.layers)
        assert {int(layer.keys.shape[0]) for layer in cache.layers} == {2}
        assert {int(layer.values.shape[0]) for layer in cache.layers} == {2}
        assert attention_state(mllm) == state  # attention implementation and marks on the modules


@pytest.mark.parametrize("method", ["damro", "vcd"])
def test_model_restored_with_the_attention_state(tiny_mllm, image, method):
    mllm = tiny_mllm("llava")
    settings = {"damro": {"k": 3, "alpha": 2.0}} if method == "damro" else {"vcd": {"alpha": 2.0}}
    assert_restored_after_exit_and_exception(mllm, image(27), method, settings, attention=True)


# ---------------------------------------------------------------------- loud failures
def test_an_attention_outside_the_dispatcher_fails_loudly(tiny_mllm, image, monkeypatch):
    """If the attention did not run through innersight's dispatcher, a batch of one would silently
    broadcast the main keys to the negative row: the branch refuses after the step instead."""
    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(28)], QUESTIONS[:1])
    monkeypatch.setattr(contrast, "innersight_text_attention", lambda model: contextlib.nullcontext())
    state = attention_state(mllm)
    with pytest.raises(MethodError, match="did not read the negative rows"):
        _run(mllm, batch, _processor(mllm, batch, "damro", "packed"), sample=False)
    assert attention_state(mllm) == state


def _layer(rows: int = 1, length: int = 5, own: int = 2) -> tuple[PackedLayer, _PackedState]:
    plain = DynamicLayer()
    plain.update(torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4))
    state = _PackedState(rows=rows)
    return PackedLayer(plain, torch.randn(rows, 2, own, 4), torch.randn(rows, 2, own, 4), state), state


def test_packed_layer_splits_rows_and_checks_every_convention():
    layer, state = _layer()
    assert layer.get_seq_length() == 5 and layer.get_mask_sizes(1) == (6, 0)
    new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = layer.update(new_k, new_v)
    assert keys.shape == (1, 2, 6, 4) and torch.equal(keys[:, :, -1:], new_k[:1])
    assert layer.get_seq_length() == 6 and layer.negative_length == 3
    assert torch.equal(layer.negative_keys[:, :, -1:], new_k[1:]) and torch.equal(layer.negative_values[:, :, -1:],
                                                                                   new_v[1:])
    with pytest.raises(MethodError, match="other keys"):
        layer.tail_inputs(torch.randn(2, 4, 1, 4), keys.clone())
    with pytest.raises(MethodError, match="did not read"):  # the previous forward's rows are still unread
        layer.update(new_k, new_v)
    state.mask = torch.tensor([[True, False, True]])[:, None, None, :]
    tail = layer.tail_inputs(torch.randn(2, 4, 1, 4), keys)
    assert tail[0] is layer.negative_keys and tail[1] is layer.negative_values and tail[2] is state.mask
    assert layer.tail_inputs(torch.randn(2, 4, 1, 4), keys) is None  # read once
    with pytest.raises(MethodError, match="rows"):
        layer.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    with pytest.raises(MethodError, match="beam search"):
        layer.batch_select_indices(torch.tensor([0]))
    with pytest.raises(MethodError, match="beam search"):
        layer.batch_repeat_interleave(2)
    layer.crop(-1)
    assert layer.get_seq_length() == 5 and layer.negative_length == 2
    plain = layer.unpacked()
    assert type(plain) is DynamicLayer and plain.keys is layer.keys


def test_packed_layer_is_not_registered_as_a_transformers_layer_type():
    from transformers import cache_utils

    mappings = [getattr(cache_utils, name) for name in ("DYNAMIC_LAYER_TYPE_MAPPING", "STATIC_LAYER_TYPE_MAPPING")
                if hasattr(cache_utils, name)]
    assert all(PackedLayer not in mapping.values() for mapping in mappings)


def test_a_non_sdpa_text_attention_keeps_the_padded_merge(tiny_mllm, image):
    from innersight.attention import set_text_attention

    mllm = tiny_mllm("llava")
    batch = mllm.prepare([image(29)], QUESTIONS[:1])
    previous = text_attention(mllm.model)
    set_text_attention(mllm.model, "eager")
    try:
        proc = _processor(mllm, batch, "damro", "packed")
        _run(mllm, batch, proc, sample=False)
        assert text_attention(mllm.model) == "eager"
    finally:
        set_text_attention(mllm.model, previous)
    details = proc.branch.details()
    assert details["negative_cache"] == "padded" and "'eager'" in details["why"]


# ---------------------------------------------------------------------- sliding-window layers (Gemma 3)
#: sliding windows of the tiny Gemma 3 (the fixture's default is 20): 8, which every negative
#: prompt outgrows at the prefill, and 17, which DAMRO's one-sample negative prompt (15 tokens)
#: outgrows only during the steps
WINDOWS = (8, 17)


def _sliding_store(proc: ContrastiveProcessor, input_ids: torch.Tensor) -> tuple:
    """Per cache layer at this step: (type, main rows, positions the negative rows have, positions
    the negative store holds)."""
    return input_ids.shape[1], [(type(layer), int(layer.keys.shape[0]), layer.negative_length,
                                 int(layer.negative_keys.shape[-2])) for layer in proc.branch.cache.layers]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("method", ["damro", "vcd"])
@pytest.mark.parametrize("rows", [1, 2])
def test_sliding_window_layers_pack_equal_to_padded_and_serial(tiny_mllm, image, window, method, rows):
    mllm = tiny_mllm("gemma3", sliding_window=window)
    batch = mllm.prepare([image(21), image(22, 50, 80)][:rows], QUESTIONS[:rows])
    if rows == 2:
        assert not bool(batch.inputs["attention_mask"].bool().all())
    runs = {way: _run(mllm, batch, _processor(mllm, batch, method, way), sample=False,
                      spy=_sliding_store if way == "packed" else None) for way in WAYS}
    packed = runs["packed"][1]
    assert packed.proc.branch.details() == {"mode": "batched", "requested": "batched", "negative_cache": "packed"}
    assert runs["serial"][1].proc.branch.details()["mode"] == "serial"
    for way in ("padded", "serial"):
        assert runs["packed"][0] == runs[way][0], way
        _assert_same_steps(packed, runs[way][1])
    main, negative, _ = packed.steps[0]
    assert float((main - negative).abs().max()) > 1e-3
    # the negative rows really slide: their positions outgrow the window during the call
    prompt, own = batch.input_ids.shape[1], packed.proc.branch.inputs.length
    assert own + STEPS > window
    kinds = set()
    for length, layers in packed.seen:
        steps = length - prompt
        for kind, main_rows, positions, held in layers:
            kinds.add(kind)
            assert main_rows == rows and positions == own + steps
            assert held == (min(own + steps, window - 1) if kind is SlidingPackedLayer else own + steps)
    assert kinds == {SlidingPackedLayer, PackedLayer}
    assert any(held < positions for _, layers in packed.seen for _, _, positions, held in layers)


@pytest.mark.parametrize("window", WINDOWS)
def test_the_shared_sliding_cache_is_plain_main_rows_after_exit(tiny_mllm, image, window):
    mllm = tiny_mllm("gemma3", sliding_window=window)
    batch = mllm.prepare([image(25), image(26, 50, 80)], QUESTIONS)
    proc = _processor(mllm, batch, "damro", "packed")
    caches = []
    _run(mllm, batch, proc, sample=False, spy=lambda proc_, input_ids: caches.append(proc_.branch.cache))
    layers = caches[-1].layers
    assert {type(layer) for layer in layers} == {DynamicSlidingWindowLayer, DynamicLayer}
    assert {int(layer.keys.shape[0]) for layer in layers} == {2}
    total = batch.input_ids.shape[1] + STEPS - 1  # the last token is chosen, not fed
    for layer in layers:
        assert layer.get_seq_length() == total
        held = min(total, window - 1) if type(layer) is DynamicSlidingWindowLayer else total
        assert int(layer.keys.shape[-2]) == held


@pytest.mark.parametrize("rows", [1, 2])
def test_icd_on_sliding_window_layers_runs_batched_packed_with_the_serial_tokens(tiny_mllm, image, rows):
    """ICD's negative prompt is longer than the main one: it has no padded merge, so before the
    sliding layers packed it ran serially on Gemma 3."""
    mllm = tiny_mllm("gemma3", sliding_window=WINDOWS[0])
    batch = mllm.prepare([image(2), image(3, 50, 80)][:rows], QUESTIONS[:rows])
    runs = {way: _run(mllm, batch, _processor(mllm, batch, "icd", way), sample=False) for way in ("packed", "serial")}
    packed = runs["packed"][1].proc.branch
    assert packed.details() == {"mode": "batched", "requested": "batched", "negative_cache": "packed"}
    assert packed.inputs.length > batch.input_ids.shape[1]
    assert runs["serial"][1].proc.branch.details() == {"mode": "serial", "requested": "serial"}
    assert runs["packed"][0] == runs["serial"][0]
    _assert_same_steps(runs["packed"][1], runs["serial"][1])


def _sliding_layer(rows: int = 1, window: int = 4, length: int = 6, own: int = 2) -> tuple:
    """A packed sliding-window layer: main rows with ``length`` positions, negative rows with ``own``."""
    plain, negative = DynamicSlidingWindowLayer(window), DynamicSlidingWindowLayer(window)
    plain.update(torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4))
    negative.update(torch.randn(rows, 2, own, 4), torch.randn(rows, 2, own, 4))
    state = _PackedState(rows=rows)
    return SlidingPackedLayer(plain, negative, state), state, plain


def test_sliding_packed_layer_keeps_the_window_of_each_side_and_checks_every_convention():
    layer, state, plain = _sliding_layer()
    assert layer.is_sliding and layer.get_seq_length() == 6 and layer.get_mask_sizes(1) == plain.get_mask_sizes(1)
    assert layer.negative_length == 2 and layer.negative_keys.shape[-2] == 2
    mask = torch.tensor([[False, True, True, True, True]])[:, None, None, :]  # the negative rows' 5 positions
    for step in range(3):  # 2 -> 3 -> 4 -> 5 negative positions: the store keeps the last window - 1 = 3
        new_k, new_v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        before = layer.negative_keys
        keys, values = layer.update(new_k, new_v)
        assert keys.shape == (1, 2, 4, 4) and torch.equal(keys[:, :, -1:], new_k[:1])  # main: window - 1 + new
        assert layer.get_seq_length() == 7 + step
        state.mask = mask[..., :3 + step]
        tail_keys, tail_values, tail_mask = layer.tail_inputs(torch.randn(2, 4, 1, 4), keys)
        assert torch.equal(tail_keys, torch.cat([before, new_k[1:]], dim=-2))  # the store plus the new position
        assert torch.equal(tail_values[:, :, -1:], new_v[1:])
        assert torch.equal(tail_mask, state.mask[..., -tail_keys.shape[-2]:])  # the padding mask's last columns
        assert layer.negative_length == 3 + step and layer.negative_keys.shape[-2] == min(3 + step, 3)
        assert torch.equal(layer.negative_keys, tail_keys[:, :, -3:])
    # the first negative position (padding) has left the window: its column is no longer read
    assert bool(tail_mask.all())
    layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    state.mask = mask  # one position short of the negative rows' 6
    with pytest.raises(MethodError, match="disagree in length"):
        layer.tail_inputs(torch.randn(2, 4, 1, 4), layer.pending)
    with pytest.raises(MethodError, match="crop"):
        layer.crop(-1)
    with pytest.raises(MethodError, match="crop"):
        layer.crop(0)
    with pytest.raises(MethodError, match="beam search"):
        layer.batch_select_indices(torch.tensor([0]))
    layer.pending = None
    layer.record_past = True
    with pytest.raises(MethodError, match="recording its past"):
        layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    layer.record_past = False
    restored = layer.unpacked()
    assert restored is plain and type(restored) is DynamicSlidingWindowLayer
    assert restored.keys is layer.keys and restored.cumulative_length == layer.cumulative_length == 10


def test_a_sliding_tail_wider_than_the_window_is_refused():
    layer, state, _ = _sliding_layer(window=4, own=2)
    keys, _ = layer.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    layer._pending_tail = (torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))  # 5 positions > window 4
    state.mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    with pytest.raises(MethodError, match="exceed the sliding window"):
        layer.tail_inputs(torch.randn(2, 4, 1, 4), keys)


def test_sliding_layers_that_cannot_pack_say_why():
    def pair(window_a=4, window_b=4, own=2):
        a, b = DynamicSlidingWindowLayer(window_a), DynamicSlidingWindowLayer(window_b)
        a.update(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
        b.update(torch.randn(1, 2, own, 4), torch.randn(1, 2, own, 4))
        return a, b

    assert contrast._why_not_packed_layer(*pair()) is None
    assert "sliding windows of 4 and 5" in contrast._why_not_packed_layer(*pair(window_b=5))
    a, b = pair()
    b.record_past = True
    assert "records its past" in contrast._why_not_packed_layer(a, b)
    a, b = pair(own=6)
    b.keys = torch.randn(1, 2, 6, 4)  # more than window - 1 = 3 positions held
    assert "last window - 1 positions" in contrast._why_not_packed_layer(a, b)
    full = DynamicLayer()
    full.update(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))
    assert "DynamicLayer" in contrast._why_not_packed_layer(a, full)
