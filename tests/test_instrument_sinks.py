"""The ``sinks`` instrument (VAR, arXiv 2503.03321): key removal against hand-computed attention,
planted massive activations give the planted dims, sink shares and attention masses, every
family, zero sinks in a random model, the model restored, and the ``innersight sinks`` command."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from innersight.adapters import FAMILIES  # noqa: E402
from innersight.attention import sdpa_forward, set_text_attention, text_attention
from innersight.cli import main
from innersight.errors import UserInputError
from innersight.instruments import get_instrument
from innersight.instruments.sinks import (
    SinkProbe,
    allowed_keys,
    measure_sinks,
    parse_dims,
    random_like,
    removal_mask,
)
from innersight.testing import planting

#: four decoder layers of hidden 64: a planted token has phi = sqrt(64 / 2) = 5.66, random ones < 4
TINY = {"num_layers": 4, "hidden_size": 64}
DIMS = (5, 11)
TAU = 4.5
EVERY = 4


# ---------------------------------------------------------------------- planted massive activations
def planted_positions(ids: torch.Tensor, pad_id: int, image_id: int) -> torch.Tensor:
    """[B, L] bool: the first real token and every image token whose index among the row's image
    tokens is 1 mod 4."""
    return planting.planted_positions(ids, pad_id, image_id, EVERY)


def planted(mllm: Any, magnitude: float = 1000.0) -> contextlib.AbstractContextManager[None]:
    """Add +-magnitude on DIMS at the planted positions to decoder layer 0's output (prompt
    forwards only), the same plant as the tests of innersight.attend.sinks."""
    return planting.planted_activations(mllm, DIMS, magnitude, EVERY)


@pytest.fixture(autouse=True)
def _sink_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INNERSIGHT_CACHE_DIR", str(tmp_path / "cache"))


def _image(seed: int, w: int = 90, h: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _samples(n: int = 2) -> list[dict]:
    questions = ["what is the letter?", "which digit is red?", "what is in the circle?"]
    return [{"id": f"s{i}", "image": _image(i, 90 - 20 * (i % 2), 60 + 10 * i), "question": questions[i % 3],
             "answer": "a"} for i in range(n)]


def _expected_share(mllm, samples) -> list[float]:
    """Per sample: planted image tokens / image tokens, from each sample's own prompt (InstructBLIP's
    prompt starts with its query tokens, so its first token is a planted image token too)."""
    adapter = mllm.adapter
    out = []
    for s in samples:
        batch = mllm.prepare([s["image"]], [s["question"]])
        positions = batch.layouts[0][0].positions
        plant = planted_positions(batch.input_ids, adapter.tokenizer.pad_token_id, adapter.image_token_id)[0]
        out.append(int(plant[positions].sum()) / positions.numel())
    return out


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _handler_attrs(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "_innersight_attention_handler"))


class _Causal:
    """The attributes sdpa_forward reads from an attention module."""

    is_causal = True


# ---------------------------------------------------------------------- removal, by hand
def _hand_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) over the allowed keys, times v: [B, H, Lq, D]."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def test_removal_mask_prefill_by_hand():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)  # [B=2, H=2, L=5, D=4]
    removed = torch.tensor([[False, True, False, True, False], [False, False, True, False, False]])
    mask = removal_mask(None, removed, 5, 5)  # [2, 1, 5, 5]
    expected = torch.tensor([  # sample 0: keys 1 and 3 removed for everyone but themselves
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 1, 1, 0],
        [1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    assert torch.equal(mask[1, 0, 4], torch.tensor([True, True, False, True, True]))
    out, _ = sdpa_forward(_Causal(), q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(out.transpose(1, 2), _hand_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # the last row of sample 0 by hand: keys 0, 2, 4 only
    logits = torch.einsum("hd,hkd->hk", q[0, :, 4], k[0, :, [0, 2, 4]]) / 2.0  # [H, 3]
    row = torch.einsum("hk,hkd->hd", torch.softmax(logits, dim=-1), v[0, :, [0, 2, 4]])  # [H, D]
    torch.testing.assert_close(out[0, 4], row, atol=1e-5, rtol=1e-5)


def test_removal_mask_decode_step_and_padding_mask():
    # decoding: one query at position lk - 1 sees every key but the removed prompt keys
    removed = torch.tensor([[False, True, True]])
    mask = removal_mask(None, removed, 1, 5)
    assert mask[0, 0, 0].tolist() == [True, False, False, True, True]
    # a bool padding mask (sample 1 padded at 0) is narrowed, never widened
    pad = torch.ones(2, 1, 3, 3, dtype=torch.bool).tril()
    pad[1, :, :, 0] = False
    mask = removal_mask(pad, torch.tensor([[False, True, False], [False, True, False]]), 3, 3)
    assert mask[1, 0].tolist() == [[False, False, False], [False, True, False], [False, False, True]]
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    # an additive float mask is read as 0 = attend
    additive = torch.zeros(1, 1, 2, 2).masked_fill(~torch.ones(2, 2, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    assert allowed_keys(additive, 1, 2, 2, torch.device("cpu"))[0, 0].tolist() == [[True, False], [True, True]]


def test_removal_mask_under_a_sliding_window_offsets_key_columns():
    # a sliding-window layer at a decoding step: 4 keys handed over, key column 0 is position 3
    removed = torch.tensor([[False, True, False, False, True, False]])  # prompt positions 1 and 4 removed
    mask = removal_mask(None, removed, 1, 4, key_offset=3)  # keys = positions 3, 4, 5, 6 (6: the new token)
    assert mask[0, 0, 0].tolist() == [True, False, True, True]
    # without the offset, column j would be read as position j: position 1 dropped instead of 4
    assert removal_mask(None, removed, 1, 4)[0, 0, 0].tolist() == [True, False, True, True]
    only_four = torch.tensor([[False, False, False, False, True, False]])
    assert removal_mask(None, only_four, 1, 4, key_offset=3)[0, 0, 0].tolist() == [True, False, True, True]
    assert removal_mask(None, only_four, 1, 4)[0, 0, 0].tolist() == [True, True, True, True]
    # an offset past the prompt removes nothing
    assert removal_mask(None, removed, 1, 3, key_offset=6)[0, 0, 0].all()


def test_random_like_counts_pool_and_seed():
    image = torch.zeros(2, 12, dtype=torch.bool)
    image[:, 2:10] = True
    removed = torch.zeros_like(image)
    removed[0, [3, 7]] = True  # sample 1 has no sinks
    picked = random_like(removed, image, [[0, 0], [0, 1]])
    assert picked[0].sum() == 2 and not picked[1].any()
    assert not (picked & removed).any() and not (picked & ~image).any()
    assert torch.equal(picked, random_like(removed, image, [[0, 0], [0, 1]]))  # seeded
    draws = {tuple(random_like(removed, image, [[s, 0], [s, 1]])[0].nonzero().flatten().tolist()) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    # more sinks than other image tokens: drawn from all image tokens
    many = torch.zeros_like(image)
    many[0, 2:9] = True  # 7 of the 8 image tokens: only 1 other token to draw from
    assert random_like(many, image, [[0, 0], [0, 1]])[0].sum() == 7


def test_parse_dims():
    assert parse_dims("") is None and parse_dims("auto") is None
    assert parse_dims("2533, 1415") == (2533, 1415)
    with pytest.raises(UserInputError, match="comma-separated"):
        parse_dims("a,b")
    with pytest.raises(UserInputError, match="non-negative"):
        parse_dims("3,-1")


# ---------------------------------------------------------------------- planted model
@pytest.fixture(scope="module")
def llava(tiny_mllm):
    return tiny_mllm("llava", **TINY)


def test_planted_dims_share_and_masses(llava):
    samples = _samples(3)
    with planted(llava):
        result = measure_sinks(llava, samples, show_progress=False, tau=TAU, cache=False, batch_size=2)
    numbers = result.numbers
    assert set(numbers["sink_dims"]) == set(DIMS) and numbers["dims_source"] == "detected"
    assert numbers["published"] is None
    shares = _expected_share(llava, samples)
    for record, share in zip(numbers["per_sample"], shares):
        # layer 0 reads the embeddings (no plant yet); layers 1.. carry the planted tokens
        assert record["sink_share"][0] == 0.0
        assert record["sink_share"][1:] == pytest.approx([share] * 3)
        assert record["text_sinks_per_layer"][1:] == [1, 1, 1]  # the first token
        assert record["masked_tokens"] == round(share * record["image_tokens"])
        assert record["peak_phi_per_layer"][2] == pytest.approx(math.sqrt(64 / 2), rel=1e-3)
    assert numbers["per_layer"]["sink_share"][2] == pytest.approx(sum(shares) / 3)
    assert numbers["masking"]["samples_with_visual_sinks"] == 3
    assert result.figure is not None
    assert "[5, 11]" in str(numbers["summary"]["sink dims"]) or "[11, 5]" in str(numbers["summary"]["sink dims"])


def test_attention_masses_equal_eager_attention(llava):
    """Sink / non-sink mass per layer from the answering row, against the eager attentions."""
    sample = _samples(1)[0]
    batch = llava.prepare([sample["image"]], [sample["question"]])
    positions = batch.layouts[0][0].positions
    sinks = positions[1::EVERY]
    others = torch.tensor([p for p in positions.tolist() if p not in set(sinks.tolist())])
    previous = text_attention(llava.model)
    with planted(llava), torch.no_grad():
        set_text_attention(llava.model, "eager")
        try:
            attentions = llava.model(**batch.inputs, output_attentions=True).attentions
        finally:
            set_text_attention(llava.model, previous)
        result = measure_sinks(llava, [sample], show_progress=False, tau=TAU, dims="5,11", cache=False)
    record = result.numbers["per_sample"][0]
    for layer, attn in enumerate(attentions):
        row = attn[0, :, -1].mean(dim=0)  # [L] the answering position, mean over heads
        if layer == 0:
            assert record["sink_mass"][0] == 0.0
            assert record["nonsink_mass"][0] == pytest.approx(float(row[positions].sum()), abs=1e-5)
            continue
        assert record["sink_mass"][layer] == pytest.approx(float(row[sinks].sum()), abs=1e-5)
        assert record["nonsink_mass"][layer] == pytest.approx(float(row[others].sum()), abs=1e-5)


def test_masking_the_planted_tokens_changes_attention_by_hand(llava):
    """Layer 0 sees the same inputs with and without the removal, so its answering row with the
    sinks removed is the plain row with those keys zeroed and renormalised; at every layer the
    removed keys get no attention."""
    sample = _samples(1)[0]
    batch = llava.prepare([sample["image"]], [sample["question"]])
    with planted(llava), torch.no_grad():
        with SinkProbe(llava, batch, DIMS, TAU) as plain:
            llava.model(**batch.inputs)
        removed = plain.sinks[2] & plain.image  # [1, L0] the planted image tokens
        with SinkProbe(llava, batch, DIMS, TAU, remove=removed) as masked:
            out = llava.model(**batch.inputs)
        before = llava.model(**batch.inputs)
    positions = batch.layouts[0][0].positions
    assert removed[0].nonzero().flatten().tolist() == positions[1::EVERY].tolist()
    keep = plain.rows[0][0].masked_fill(removed[0], 0.0)
    torch.testing.assert_close(masked.rows[0][0], keep / keep.sum(), atol=1e-6, rtol=1e-5)
    for layer in range(4):
        assert float(masked.rows[layer][0][removed[0]].abs().max()) == 0.0
        assert float(plain.rows[layer][0][removed[0]].sum()) > 0
    assert not torch.allclose(out.logits, before.logits)


def test_zero_sinks_in_a_random_model(llava):
    result = measure_sinks(llava, _samples(2), show_progress=False, cache=False)
    numbers = result.numbers
    assert numbers["sink_dims"] == []
    assert numbers["per_layer"]["sink_share"] == [0.0] * 4
    assert numbers["masking"]["changed"] == {"sinks": 0.0, "random": 0.0}
    assert numbers["masking"]["samples_with_visual_sinks"] == 0
    for key in ("plain", "sinks", "random"):  # accuracy in percent, as in every instrument
        scores = [row["scores"][key] for row in numbers["per_sample"]]
        assert numbers["masking"]["accuracy"][key] == pytest.approx(100 * sum(scores) / len(scores))
    assert "no sink dimensions" in numbers["summary"]["note"]
    assert result.figure is not None


def test_model_unchanged_after_a_run_and_after_an_exception(llava, monkeypatch):
    samples = _samples(2)
    batch = llava.prepare([samples[0]["image"]], [samples[0]["question"]])
    with torch.no_grad():
        before = llava.model(**batch.inputs).logits
    hooks, impl = _hooks(llava.model), text_attention(llava.model)
    with planted(llava):
        measure_sinks(llava, samples, show_progress=False, tau=TAU, dims="5,11", cache=False)
    assert _hooks(llava.model) == hooks and text_attention(llava.model) == impl
    seen = []

    def failing(batch, **kwargs):
        seen.append((_handler_attrs(llava.model), text_attention(llava.model)))
        raise RuntimeError("boom inside generate")

    monkeypatch.setattr(llava, "generate", failing)
    with pytest.raises(RuntimeError, match="boom"):
        measure_sinks(llava, samples, show_progress=False, tau=TAU, dims="5,11", cache=False)
    assert seen == [(4, "innersight")]  # the handlers were installed when it failed
    monkeypatch.undo()
    assert _hooks(llava.model) == hooks and text_attention(llava.model) == impl and _handler_attrs(llava.model) == 0
    with torch.no_grad():
        after = llava.model(**batch.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_refusals(llava):
    with pytest.raises(UserInputError, match="at least one"):
        measure_sinks(llava, [], show_progress=False)
    with pytest.raises(UserInputError, match="hidden size"):
        measure_sinks(llava, _samples(1), show_progress=False, dims="64")
    with pytest.raises(UserInputError, match="first_layer"):
        measure_sinks(llava, _samples(1), show_progress=False, first_layer=4, dims="5")
    with pytest.raises(UserInputError, match="question"):
        measure_sinks(llava, [{"id": "x", "image": _image(0), "question": " ", "answer": "a"}], show_progress=False)
    assert get_instrument("sinks").default_benchmark == "micro-details"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_planted(tiny_mllm, family):
    mllm = tiny_mllm(family, **TINY)
    samples = _samples(2)
    with planted(mllm):
        result = measure_sinks(mllm, samples, show_progress=False, tau=TAU, dims="5,11", cache=False)
    shares = _expected_share(mllm, samples)
    for record, share in zip(result.numbers["per_sample"], shares):
        assert record["sink_share"][1:] == pytest.approx([share] * 3)
        assert record["masked_tokens"] >= 1
        assert set(record["answers"]) == {"plain", "sinks", "random"}
    per = result.numbers["per_layer"]
    assert len(per["sink_mass"]) == 4 and all(m > 0 for m in per["sink_mass"][1:])


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def untrained_micro(tmp_path_factory):
    from innersight.demo.micro import build_untrained, save

    model, processor = build_untrained(seed=0)
    return save(model, processor, tmp_path_factory.mktemp("micro_untrained"), storage_dtype="float32")


def test_cli_sinks_writes_png_and_json_and_prints_dims(untrained_micro, tmp_path, capsys):
    out = tmp_path / "figs" / "x.png"
    code = 0
    try:
        main(["sinks", "--model", str(untrained_micro), "-o", str(out), "--limit", "2"])
    except SystemExit as exc:
        code = exc.code or 0
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert out.is_file() and out.stat().st_size > 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["instrument"] == "sinks" and data["n_samples"] == 2
    assert data["settings"]["benchmark"] == "micro-details"
    assert data["numbers"]["sink_dims"] == []
    assert "sink dims: none detected" in stdout
    assert f"figure: {out}" in stdout and f"numbers: {out.with_suffix('.json')}" in stdout
    assert not list(tmp_path.glob("**/sinks.png"))  # no stray default-named files
    with pytest.raises(SystemExit):
        main(["sinks", "--model", str(untrained_micro), "-o", str(tmp_path / "x.jpg")])
    assert "must be a .png" in capsys.readouterr().err
